"""Hostile inputs through the command line: refused before anything runs or is written, in one line."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, make_shardset
from trainer import checkpoint, safe_load

TINY = ["data=shards", "data.tokenizer=bytes", "data.seq_len=32", "data.steps_per_shard=2", "data.eval_sequences=4",
        "model.d_model=32", "model.max_seq_len=64", "train.steps=4", "train.micro_batch=4", "train.warmup_steps=1",
        "train.eval_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=5", "engine.threads=1",
        "run.progress=false", "run.plots=false", "run.wandb=disabled",
        "data.subset=holdout", "data.holdout_fraction=0.2"]  # a proxy that mixtrain score accepts


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
    ok(mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={root / 'run'}"], root))
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


# ---- 2. one job per run directory ---------------------------------------------------------------------

def _wait_for(predicate, proc, seconds=120):
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_second_job_on_a_run_dir_fails_at_once_and_a_dead_jobs_lock_is_taken_over(tmp_path, data):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", *TINY, f"data.path={data}", f"run.dir={run}",
                              "train.steps=100000", "train.eval_every=0", "train.checkpoint_every=1"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: checkpoint.latest(run / "checkpoints") is not None, first)  # training and saving
        t = time.time()
        second = mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.steps=100000"], tmp_path)
        assert second.returncode != 0 and time.time() - t < 60
        assert f"is in use by another job (pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert first.poll() is None  # the first job trains on
    finally:
        first.kill()
        first.wait()
    again = ok(mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.resume=replace"], tmp_path))
    assert f"took over the lock {run / '.lock'} left by a job that ended without releasing it (pid {first.pid}" \
        in again.stdout + again.stderr
    assert (run / ".lock").read_text() == ""  # released at the end: nobody to report


# ---- 3. runs never mix -------------------------------------------------------------------------------

def _listing(run: Path) -> dict:
    return {str(p.relative_to(run)): p.stat().st_size for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_resume_never_refuses_a_run_dir_with_checkpoints_and_replace_moves_them_aside(tmp_path, data, finished):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    old_id = (run / "run_id.txt").read_text().strip()
    before = _listing(run)
    refused = mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.resume=never"], tmp_path)
    assert refused.returncode != 0
    assert "train.resume=never, but run.dir=" in refused.stderr and "train.resume=replace" in refused.stderr
    assert _listing(run) == before  # nothing touched
    ok(mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.resume=replace", "train.steps=6"],
                tmp_path))
    (aside,) = run.glob("replaced-*")
    assert [p.name for p in checkpoint.complete_checkpoints(aside / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert (aside / "run_id.txt").read_text().strip() == old_id
    new_id = (run / "run_id.txt").read_text().strip()
    assert new_id != old_id
    assert {checkpoint.run_id(p) for p in checkpoint.complete_checkpoints(run / "checkpoints")} == {new_id}
    assert {json.loads(line)["run_id"] for line in (run / "metrics.jsonl").read_text().splitlines()} == {new_id}
    assert json.loads((run / "weights.json").read_text())["run_id"] == new_id


def test_another_runs_checkpoints_are_never_pruned_nor_loaded(tmp_path, data, finished):
    """A newer checkpoint of another run dropped into the folder is passed over, and survives pruning."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    foreign = run / "checkpoints" / "step_00000005"
    subprocess.run(["cp", "-r", str(run / "checkpoints" / "step_00000004"), str(foreign)], check=True)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "run_id": "someone-else", "step": 5}))
    proc = ok(mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.keep_checkpoints=1",
                        "train.steps=4"], tmp_path))
    out = proc.stdout + proc.stderr
    assert "ignoring 1 checkpoint(s) of other runs" in out and "resumed from" in out and "step_00000004 at step 4" in out
    assert foreign.is_dir()  # not pruned (keep_checkpoints=1 pruned this run's step 2)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000005"]


# ---- 4. a damaged newest checkpoint -----------------------------------------------------------------

DAMAGE = {
    "truncated state.pt": lambda c: (c / "state.pt").write_bytes((c / "state.pt").read_bytes()[:1000]),
    "invalid meta.json": lambda c: (c / "meta.json").write_text("{not json"),
    "deleted state.pt": lambda c: (c / "state.pt").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, data, finished, damage):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    DAMAGE[damage](run / "checkpoints" / "step_00000004")
    proc = ok(mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.steps=4"], tmp_path))
    out = proc.stdout + proc.stderr
    assert f"skipping damaged checkpoint {run / 'checkpoints' / 'step_00000004'}" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == [0, 1, 2, 3]  # steps 2-3 replayed once, the earlier records kept


def test_no_readable_checkpoint_is_refused_not_restarted(tmp_path, data, finished):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    for damage, step in zip(DAMAGE.values(), ("step_00000004", "step_00000002")):
        damage(run / "checkpoints" / step)
    before = _listing(run)
    proc = mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.steps=4"], tmp_path)
    assert proc.returncode != 0
    assert "no readable checkpoint in" in proc.stderr and "train.resume=replace" in proc.stderr
    assert _listing(run) == before  # the logs were not cut back, nothing was written


# ---- 8. a refusal is one clear line ------------------------------------------------------------------

def test_refused_launch_prints_one_line_exits_2_and_leaves_nothing(tmp_path, data):
    refused = mixtrain(["train", *TINY, f"data.path={data}", "train.lr=-1"], tmp_path)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("mixtrain: error: train.lr=-1") and line.endswith("must be > 0")
    assert not (tmp_path / "runs").exists()  # no Hydra folder, no run directory
    explicit = mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={tmp_path / 'new'}", "mixture=doremi",
                         f"mixture.reference={tmp_path / 'nowhere'}"], tmp_path)
    assert explicit.returncode == 2 and len(explicit.stderr.strip().splitlines()) == 1, explicit.stderr
    assert "mixture.reference=" in explicit.stderr and not (tmp_path / "new").exists()
    full = subprocess.run([sys.executable, "-m", "trainer.cli", "train", *TINY, f"data.path={data}", "train.lr=-1"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "must be > 0" in full.stderr


# ---- 6. divergence is an error -----------------------------------------------------------------------

def _all_finite(ckpt: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in safe_load.load(ckpt / "state.pt")["engine"]["model"].values())


def test_divergence_stops_the_run_and_writes_nothing_non_finite(tmp_path, data):
    run = tmp_path / "run"
    proc = mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.lr=1e30", "train.min_lr=0",
                     "train.checkpoint_every=1"], tmp_path)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mixtrain: error: the run diverged at step 1: training loss not finite in ")
    assert "train.on_nonfinite=abort" in line and f"the last good checkpoint is {run / 'checkpoints'}" in line
    assert not (run / "weights.json").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")] == ["step_00000001"]
    assert _all_finite(run / "checkpoints" / "step_00000001")


def test_skip_drops_non_finite_updates_then_aborts_after_too_many(tmp_path, data):
    run = tmp_path / "run"
    proc = mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.lr=1e30", "train.min_lr=0",
                     "train.checkpoint_every=1", "train.on_nonfinite=skip", "train.max_nonfinite=2"], tmp_path)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "step 1: training loss not finite" in out and "update skipped (1 in a row" in out
    assert "update skipped (2 in a row" in out and "diverged at step 3" in out and "3 in a row > train.max_nonfinite=2" in out
    ckpts = checkpoint.complete_checkpoints(run / "checkpoints")
    assert ckpts and all(_all_finite(c) for c in ckpts)
    refused = mixtrain(["train", *TINY, f"data.path={data}", "train.on_nonfinite=retry"], tmp_path)
    assert refused.returncode == 2 and "train.on_nonfinite='retry'; allowed: abort, skip" in refused.stderr
