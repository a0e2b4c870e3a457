"""Fault handling under torchrun's elastic restarts: 2 CPU ranks (gloo) through launch/torchrun.sh
with MAX_RESTARTS=1.

One rank is SIGKILLed (train.fail_rank), either between checkpoints or while its part of a
checkpoint is on disk but before the rename that completes it (train.fail_in_checkpoint).
torchrun tears the group down and restarts it; the run must resume from the latest *complete*
checkpoint and end exactly as an uninterrupted run of the same config: the same shards in the same
order (weights.jsonl: shard index and a hash of the samples it holds), every step's metrics once
and identical, identical final parameters. The fast tests cover the knobs' validation and a save
over the debris an interrupted save leaves.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, losses_by_step, make_shardset, tiny_values

from trainer import checkpoint, engines
from trainer.config import ConfigError, load_config
from trainer.tracking import read_jsonl

STEPS, PER_SHARD, EVERY = 10, 3, 4  # checkpoints at 4 and 8 (mid-shard: shards start at 0, 3, 6, 9)
ARGS = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.max_seq_len=64",
    "data.seq_len=32",
    f"data.steps_per_shard={PER_SHARD}",
    "data.eval_sequences=4",
    f"train.steps={STEPS}",
    "train.micro_batch=2",
    "train.warmup_steps=1",
    "train.eval_every=5",
    f"train.checkpoint_every={EVERY}",
    "mixture=odm",
    "run.wandb=disabled",
    "run.plots=false",
    "run.progress=false",
    "engine.threads=1",
]


def _launch(data: Path, run_dir: Path, *extra: str, restarts: int = 0) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RUN_DIR", "MAX_RESTARTS", "TORCH_DISABLE_SHARE_RDZV", "TORCHELASTIC_", "MASTER_"))
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        RUN_DIR=str(run_dir),
        MAX_RESTARTS=str(restarts),
    )
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), "2", "data=shards", f"data.path={data}", *ARGS, *extra],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    proc.log = proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    data = make_shardset(root / "data")
    proc = _launch(data, root / "ref")
    assert proc.returncode == 0, proc.log[-4000:]
    return data, root / "ref"


def _shards(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "weights.jsonl") if not r.get("final")]


def _final_model(run_dir: Path) -> dict:
    (last,) = [p for p in checkpoint.complete_checkpoints(run_dir / "checkpoints") if p.name == f"step_{STEPS:08d}"]
    return engines.read_checkpoint(last, 0)[0]["engine"]["model"]


def _assert_same_as_uninterrupted(run: Path, ref: Path) -> None:
    shards, ref_shards = _shards(run), _shards(ref)
    # every shard exactly once, in order, holding the same samples with the same weights
    assert [(s["shard"], s["step"]) for s in shards] == [(i, i * PER_SHARD) for i in range(len(ref_shards))]
    assert [s["samples"] for s in shards] == [s["samples"] for s in ref_shards]
    assert shards == ref_shards
    assert (
        len({json.dumps(s["weights"]) for s in ref_shards}) > 1
    )  # the controller moved: a replay has state to get wrong
    # each step's training record once (a step replayed after the resume replaced the pre-crash one)
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in metrics if "train/loss" in r] == list(range(STEPS))
    assert len(metrics) == len(read_jsonl(ref / "metrics.jsonl"))
    assert losses_by_step(run) == losses_by_step(ref)  # bit-exact: losses, lr, grad norms, weights, evaluations
    model, ref_model = _final_model(run), _final_model(ref)
    assert model.keys() == ref_model.keys()
    assert all(torch.equal(model[k], ref_model[k]) for k in model)
    weights, ref_weights = (json.loads((d / "weights.json").read_text()) for d in (run, ref))
    # one run across the crash: the resumed job kept the id its first attempt drew
    assert {r["run_id"] for r in metrics} == {weights.pop("run_id")} != {ref_weights.pop("run_id")}
    assert weights == ref_weights
    assert not list((run / "checkpoints").glob("*.tmp"))


def _assert_one_restart_from(proc, run: Path, killed_rank: int, step: int) -> None:
    assert proc.returncode == 0, proc.log[-4000:]
    assert f"[mixtrain] fault injection: killing rank {killed_rank}" in proc.log
    # torchrun saw the group fail (it names the first failure it polled: the killed rank, or the
    # other one when its collective failed first) and restarted it
    assert re.search(r"failed \(exitcode: -?\d+\) local_rank: [01]", proc.log)
    assert proc.log.count("resumed from") == 1
    assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}'} at step {step}" in proc.log
    assert f"done: {STEPS} steps" in proc.log


def test_rank_killed_between_checkpoints(ref, tmp_path):
    """Rank 1 dies after step 7 (checkpoint 4 complete, shard 2 planned and logged): the restarted
    group resumes mid-shard at step 4 and replays shards 1-2 exactly."""
    data, ref_dir = ref
    run = tmp_path / "run"
    proc = _launch(data, run, "train.fail_at_step=7", "++train.fail_rank=1", restarts=1)
    _assert_one_restart_from(proc, run, killed_rank=1, step=4)
    _assert_same_as_uninterrupted(run, ref_dir)


@pytest.mark.slow
def test_rank_killed_while_writing_a_checkpoint(ref, tmp_path):
    """Rank 0 (the one that completes a save) dies with step_8.tmp holding its state and RNG: the
    partial checkpoint is not taken, the restart resumes from step 4 and the rerun save replaces it."""
    data, ref_dir = ref
    run = tmp_path / "run"
    proc = _launch(
        data, run, "train.fail_at_step=8", "++train.fail_rank=0", "++train.fail_in_checkpoint=true", restarts=1
    )
    partial = run / "checkpoints" / "step_00000008.tmp"
    held = re.search(rf"killing rank 0 while writing {re.escape(str(partial))} \(holding ([^)]*)\)", proc.log)
    assert held and {"rng_rank0.pt", "state.pt"} <= set(held.group(1).split(", ")), proc.log[
        -4000:
    ]  # rank 1's RNG: a race
    _assert_one_restart_from(proc, run, killed_rank=0, step=4)
    _assert_same_as_uninterrupted(run, ref_dir)


def test_fault_knobs_are_validated(tmp_path):
    def cfg(**train):
        return load_config(tiny_values(tmp_path, tmp_path / "run", **{f"train.{k}": v for k, v in train.items()}))

    cfg(fail_at_step=3, fail_rank=1)
    cfg(fail_at_step=8, checkpoint_every=4, fail_in_checkpoint=True)
    cfg(fail_at_step=8, fail_in_checkpoint=True)  # train.steps=8: the final save
    with pytest.raises(ConfigError, match="fail_rank"):
        cfg(fail_at_step=3, fail_rank=-2)
    for step in (6, 0, 12):  # between checkpoints, off, past the end
        with pytest.raises(ConfigError, match="fail_in_checkpoint"):  # a fault that could never fire
            cfg(fail_in_checkpoint=True, fail_at_step=step, checkpoint_every=4)


class _Value:
    """The smallest stateful part: its state is a value."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value


def test_save_over_an_interrupted_save(tmp_path):
    """Debris of a save killed before its rename, even one that got as far as meta.json, is never
    the latest, and the next save of that step replaces it whole (no stale file survives)."""
    root = tmp_path / "checkpoints"
    done = checkpoint.save(root, 4, {"x": _Value(4)}, {"fingerprint": {}}, keep=2)
    debris = root / "step_00000008.tmp"
    debris.mkdir()
    torch.save({"x": "stale"}, debris / "state.pt")
    torch.save({}, debris / "rng_rank1.pt")  # another world size's file: must not leak into the new checkpoint
    (debris / "meta.json").write_text(json.dumps({"step": 8, "complete": True}))
    assert checkpoint.latest(root) == done
    assert checkpoint.complete_checkpoints(root) == [done]
    saved = checkpoint.save(root, 8, {"x": _Value(8)}, {"fingerprint": {}}, keep=2)
    assert checkpoint.latest(root) == saved and not debris.exists()
    assert sorted(p.name for p in saved.iterdir()) == ["meta.json", "rng_rank0.pt", "state.pt"]
    assert engines.read_checkpoint(saved, 0)[0] == {"x": 8}
