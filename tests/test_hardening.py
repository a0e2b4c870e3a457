"""Hostile inputs through the command line: refused before anything runs or is written, in one line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, make_shardset
from trainer import checkpoint, safe_load

TINY = ["data=shards", "data.tokenizer=bytes", "data.seq_len=32", "data.steps_per_shard=2", "data.eval_sequences=4",
        "model.d_model=32", "model.max_seq_len=64", "train.steps=4", "train.micro_batch=4", "train.warmup_steps=1",
        "train.eval_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=5", "engine.threads=1",
        "run.progress=false", "run.plots=false", "run.wandb=disabled"]


def mixtrain(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("hardening") / "data")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished 4-step run with checkpoints at steps 2 and 4 (a DoReMi reference, a proxy to score)."""
    root = tmp_path_factory.mktemp("finished")
    ok(mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={root / 'run'}", "data.subset=holdout",
                  "data.holdout_fraction=0.2"], root))
    return root / "run"


class Payload:
    """Unpickled, it would create ``marker``: what a crafted checkpoint could do with a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_loader_keeps_numpy_state_and_refuses_code(tmp_path):
    state = {"weights": np.arange(3, dtype=np.float64), "count": np.int64(7), "flag": np.bool_(True),
             "rng": {"state": np.random.default_rng(0).bit_generator.state}, "t": torch.ones(2)}
    torch.save(state, tmp_path / "good.pt")
    back = safe_load.load(tmp_path / "good.pt")
    assert np.array_equal(back["weights"], state["weights"]) and back["count"] == 7 and back["flag"]
    safe_load.vet(tmp_path / "good.pt")
    marker = tmp_path / "ran"
    torch.save({"engine": Payload(marker)}, tmp_path / "evil.pt")
    torch.save({"x": np.array([1, "a"], dtype=object)}, tmp_path / "objects.pt")
    for path in (tmp_path / "evil.pt", tmp_path / "objects.pt"):
        with pytest.raises(safe_load.UnsafeCheckpoint, match="refused to load"):
            safe_load.load(path)
    with pytest.raises(safe_load.UnsafeCheckpoint, match="names posix.system"):
        safe_load.vet(tmp_path)  # a folder: every *.pt below it (DeepSpeed's files before DeepSpeed loads them)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["state.pt", "rng_rank0.pt"])
def test_crafted_checkpoint_runs_nothing_through_any_entry_point(tmp_path, data, finished, target):
    """train.resume, mixture.reference and mixtrain score each refuse the file; the payload never runs."""
    run = tmp_path / "victim"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    marker = tmp_path / "PWNED"
    for ckpt in checkpoint.complete_checkpoints(run / "checkpoints"):
        torch.save({"engine": Payload(marker)}, ckpt / target)
    latest = checkpoint.latest(run / "checkpoints")
    entries = {
        "train.resume=PATH": ["train", *TINY, f"data.path={data}", f"run.dir={tmp_path / 'resumed'}",
                              f"train.resume={latest}", "train.steps=6"],
        "train.resume=auto": ["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.steps=6"],
        "mixture.reference": ["train", *TINY, f"data.path={data}", f"run.dir={tmp_path / 'doremi'}", "mixture=doremi",
                              f"mixture.reference={run}"],
        "score": ["score", str(run), "--early", "2", "--late", "4"],
    }
    if target != "state.pt":
        del entries["mixture.reference"], entries["score"]  # frozen models read state.pt only
    for name, args in entries.items():
        proc = mixtrain(args, tmp_path)
        assert proc.returncode != 0, f"{name} accepted a crafted {target}"
        assert "refused to load" in proc.stderr and "names posix.system" in proc.stderr, (name, proc.stderr[-2000:])
        assert not marker.exists(), f"{name} ran the payload"
