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
from helpers import REPO, TINY_CLI, make_shardset

from trainer import checkpoint, safe_load

TINY = [
    *TINY_CLI,
    "train.checkpoint_every=2",
    "train.keep_checkpoints=5",
    "run.plots=false",
    "run.wandb=disabled",
    "data.subset=holdout",
    "data.holdout_fraction=0.2",
]  # a proxy that mixtrain score accepts


def mixtrain(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


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
    state = {
        "weights": np.arange(3, dtype=np.float64),
        "count": np.int64(7),
        "flag": np.bool_(True),
        "rng": {"state": np.random.default_rng(0).bit_generator.state},
        "t": torch.ones(2),
    }
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
        "train.resume=PATH": [
            "train",
            *TINY,
            f"data.path={data}",
            f"run.dir={tmp_path / 'resumed'}",
            f"train.resume={latest}",
            "train.steps=6",
        ],
        "train.resume=auto": ["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.steps=6"],
        "mixture.reference": [
            "train",
            *TINY,
            f"data.path={data}",
            f"run.dir={tmp_path / 'doremi'}",
            "mixture=doremi",
            f"mixture.reference={run}",
        ],
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
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "train",
            *TINY,
            f"data.path={data}",
            f"run.dir={run}",
            "train.steps=100000",
            "train.eval_every=0",
            "train.checkpoint_every=1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    assert (
        f"took over the lock {run / '.lock'} left by a job that ended without releasing it (pid {first.pid}"
        in again.stdout + again.stderr
    )
    assert (run / ".lock").read_text() == ""  # released at the end: nobody to report


# ---- 3. runs never mix -------------------------------------------------------------------------------


def _listing(run: Path) -> dict:
    return {
        str(p.relative_to(run)): p.stat().st_size for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def test_resume_never_refuses_a_run_dir_with_checkpoints_and_replace_moves_them_aside(tmp_path, data, finished):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    old_id = (run / "run_id.txt").read_text().strip()
    before = _listing(run)
    refused = mixtrain(["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.resume=never"], tmp_path)
    assert refused.returncode != 0
    assert "train.resume=never, but run.dir=" in refused.stderr and "train.resume=replace" in refused.stderr
    assert _listing(run) == before  # nothing touched
    ok(
        mixtrain(
            ["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.resume=replace", "train.steps=6"], tmp_path
        )
    )
    (aside,) = run.glob("replaced-*")
    old = checkpoint.complete_checkpoints(aside / "checkpoints")
    assert [p.name for p in old] == ["step_00000002", "step_00000004"]
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
    proc = ok(
        mixtrain(
            ["train", *TINY, f"data.path={data}", f"run.dir={run}", "train.keep_checkpoints=1", "train.steps=4"],
            tmp_path,
        )
    )
    out = proc.stdout + proc.stderr
    assert "ignoring 1 checkpoint(s) of other runs" in out
    assert "resumed from" in out and "step_00000004 at step 4" in out
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
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in json.loads(line)
    ]
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
    explicit = mixtrain(
        [
            "train",
            *TINY,
            f"data.path={data}",
            f"run.dir={tmp_path / 'new'}",
            "mixture=doremi",
            f"mixture.reference={tmp_path / 'nowhere'}",
        ],
        tmp_path,
    )
    assert explicit.returncode == 2 and len(explicit.stderr.strip().splitlines()) == 1, explicit.stderr
    assert "mixture.reference=" in explicit.stderr and not (tmp_path / "new").exists()
    full = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", *TINY, f"data.path={data}", "train.lr=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"},
    )
    assert full.returncode != 0 and "Traceback" in full.stderr and "must be > 0" in full.stderr


# ---- 6. divergence is an error -----------------------------------------------------------------------


def _all_finite(ckpt: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in safe_load.load(ckpt / "state.pt")["engine"]["model"].values())


def test_divergence_stops_the_run_and_writes_nothing_non_finite(tmp_path, data):
    run = tmp_path / "run"
    proc = mixtrain(
        [
            "train",
            *TINY,
            f"data.path={data}",
            f"run.dir={run}",
            "train.lr=1e30",
            "train.min_lr=0",
            "train.checkpoint_every=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mixtrain: error: the run diverged at step 1: training loss not finite in ")
    assert "train.on_nonfinite=abort" in line and f"the last good checkpoint is {run / 'checkpoints'}" in line
    assert not (run / "weights.json").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")] == ["step_00000001"]
    assert _all_finite(run / "checkpoints" / "step_00000001")


def test_skip_drops_non_finite_updates_then_aborts_after_too_many(tmp_path, data):
    run = tmp_path / "run"
    proc = mixtrain(
        [
            "train",
            *TINY,
            f"data.path={data}",
            f"run.dir={run}",
            "train.lr=1e30",
            "train.min_lr=0",
            "train.checkpoint_every=1",
            "train.on_nonfinite=skip",
            "train.max_nonfinite=2",
        ],
        tmp_path,
    )
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "step 1: training loss not finite" in out and "update skipped (1 in a row" in out
    assert "update skipped (2 in a row" in out and "diverged at step 3" in out
    assert "3 in a row > train.max_nonfinite=2" in out
    ckpts = checkpoint.complete_checkpoints(run / "checkpoints")
    assert ckpts and all(_all_finite(c) for c in ckpts)
    refused = mixtrain(["train", *TINY, f"data.path={data}", "train.on_nonfinite=retry"], tmp_path)
    assert refused.returncode == 2 and "train.on_nonfinite='retry'; allowed: abort, skip" in refused.stderr


# ---- 7. every knob typed and range-checked at load -------------------------------------------------------

BAD_KNOBS = [
    ({"train.steps": 7.5}, "train.steps=7.5 must be an integer"),
    ({"train.steps": "ten"}, "train.steps='ten' must be an integer"),
    ({"train.seed": -1}, "train.seed=-1 must be in [0, 2**32)"),
    ({"train.grad_clip": float("nan")}, "train.grad_clip=nan must be a finite number"),
    ({"train.lr": float("inf")}, "train.lr=inf must be a finite number"),
    ({"train.weight_decay": -0.1}, "train.weight_decay=-0.1 must be >= 0"),
    ({"model.bias": 1}, "model.bias=1 must be true or false"),
    ({"train.micro_batch": True}, "train.micro_batch=True must be an integer"),
    ({"data.domains": "abc"}, "data.domains='abc' must be a list or null"),
    ({"run.name": "../.."}, "run.name='../..' must be one folder name"),
    ({"run.wandb_tags": ["a", ""]}, "run.wandb_tags=['a', ''] must be a list of non-empty strings"),
]


@pytest.mark.parametrize(
    "override,message", BAD_KNOBS, ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _ in BAD_KNOBS]
)
def test_knobs_are_typed_and_range_checked_at_load(tmp_path, data, override, message):
    from helpers import tiny_values

    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(tiny_values(data, tmp_path / "run", **override))
    assert str(e.value).startswith(message)


def test_integral_floats_and_numeric_strings_are_taken(tmp_path, data):
    from helpers import tiny_values

    from trainer.config import load_config

    cfg = load_config(tiny_values(data, tmp_path / "run", **{"train.steps": 8.0, "train.lr": "1e-3"}))
    assert cfg.train.steps == 8 and isinstance(cfg.train.steps, int) and cfg.train.lr == 1e-3


def test_bad_knobs_through_the_cli_and_booleans_in_a_weights_file(tmp_path, data):
    (tmp_path / "cwd").mkdir()
    escape = mixtrain(["train", *TINY, f"data.path={data}", "run.name=../../escaped"], tmp_path / "cwd")
    assert escape.returncode == 2 and "run.name='../../escaped' must be one folder name" in escape.stderr
    assert not list(tmp_path.rglob("escaped*"))  # Hydra made no folder anywhere
    steps = mixtrain(["train", *TINY, f"data.path={data}", "train.steps=7.5"], tmp_path)
    assert steps.returncode == 2 and steps.stderr.strip() == "mixtrain: error: train.steps=7.5 must be an integer"
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"abc": True, "counting": False, "noise": 1, "words": 1}))
    bools = mixtrain(
        ["train", *TINY, f"data.path={data}", "mixture=static", f"mixture.weights_from={weights}"], tmp_path
    )
    assert bools.returncode == 2
    assert "the weight of 'abc' is True; each weight must be a finite number >= 0" in bools.stderr


# ---- 9. wandb follows its own conventions ------------------------------------------------------------


def _tracker(tmp_path, monkeypatch, env: dict, **knobs):
    from trainer.config import RunConfig
    from trainer.tracking import Tracker

    for k in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = RunConfig(**knobs)
    run.validate()
    tmp_path.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(tmp_path, {}, enabled=True, wandb=run, run_id="abc123")
    tracker.open()
    return tracker


def test_wandb_environment_applies_when_the_knob_is_unset(tmp_path, monkeypatch):
    disabled = _tracker(tmp_path / "a", monkeypatch, {"WANDB_MODE": "disabled"})
    assert disabled._wandb is None and not (tmp_path / "a" / "wandb").exists()
    disabled.close()
    env = _tracker(tmp_path / "b", monkeypatch, {"WANDB_MODE": "offline", "WANDB_PROJECT": "from-env"})
    assert env._wandb.project == "from-env" and env._wandb.settings.mode == "offline"
    env.close()
    knob = _tracker(
        tmp_path / "c",
        monkeypatch,
        {"WANDB_MODE": "disabled", "WANDB_PROJECT": "from-env"},
        wandb="offline",
        wandb_project="from-knob",
        wandb_group="sweep-1",
        wandb_tags=["doge", "proxy"],
    )
    assert knob._wandb.project == "from-knob" and knob._wandb.group == "sweep-1"
    assert tuple(knob._wandb.tags) == ("doge", "proxy")
    weights = tmp_path / "c" / "weights.json"
    weights.write_text(json.dumps({"train_domain_weights": {"a": 1.0}}))
    knob.log_artifact(weights, "weights-abc123", "mixture")
    knob.close()
    (log,) = (tmp_path / "c" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"weights-abc123" in log.read_bytes()  # the artifact is recorded in the offline run
    with pytest.raises(Exception, match="WANDB_MODE='cloud'; allowed: offline, online, disabled"):
        _tracker(tmp_path / "d", monkeypatch, {"WANDB_MODE": "cloud"})


# ---- 5. changed or damaged data is refused before step 0 ----------------------------------------------


def _copy_data(data: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-r", str(data), str(dest)], check=True)
    return dest


def test_truncated_bin_is_refused_before_step_0(tmp_path, data):
    shards = _copy_data(data, tmp_path / "data")
    bin_path = shards / "abc" / "train.bin"
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as f:
        f.truncate(size // 4 * 2)  # half, still a whole number of uint16 tokens
    proc = mixtrain(["train", *TINY, f"data.path={shards}", f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert f"{shards / 'abc' / 'train'}.bin holds" in proc.stderr and "its .idx describes" in proc.stderr


@pytest.mark.parametrize("recorded", [True, False], ids=["manifest records the max id", "older manifest: scanned"])
def test_token_ids_beyond_the_vocabulary_are_refused_before_step_0(tmp_path, data, recorded):
    from trainer.data.indexed import write_indexed

    shards = _copy_data(data, tmp_path / "data")
    manifest = json.loads((shards / "manifest.json").read_text())
    info = write_indexed(shards / "abc" / "train", [np.arange(300, 400, dtype=np.uint16)] * 10)
    split = manifest["domains"]["abc"]["splits"]["train"]
    split.update(info)
    for d in manifest["domains"].values():
        for sp in d["splits"].values():
            if not recorded:
                sp.pop("max_token", None)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = mixtrain(["train", *TINY, f"data.path={shards}", f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert "data: abc/train" in proc.stderr and "holds token id 399, beyond the 257 ids of its tokenizer" in proc.stderr


def test_resume_on_re_ingested_data_names_what_changed(tmp_path):
    shards = make_shardset(tmp_path / "data", seed=0)
    run = tmp_path / "run"
    ok(mixtrain(["train", *TINY, f"data.path={shards}", f"run.dir={run}", "train.steps=2"], tmp_path))
    make_shardset(shards, seed=1)  # same names and sizes of corpus, other documents
    proc = mixtrain(["train", *TINY, f"data.path={shards}", f"run.dir={run}", "train.steps=2"], tmp_path)
    assert proc.returncode == 2 and "differing knobs" in proc.stderr
    assert "shards.abc/train: checkpoint" in proc.stderr


# ---- 8. a full disk during a save ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs the right to mount, e.g. root in a container)."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, data, small_disk):
    run = small_disk / "run"
    proc = mixtrain(
        [
            "train",
            *TINY,
            f"data.path={data}",
            f"run.dir={run}",
            "train.steps=100",
            "train.checkpoint_every=1",
            "train.eval_every=0",
        ],
        tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mixtrain: error: no space left on device while writing checkpoint ")
    kept = checkpoint.latest(run / "checkpoints")
    assert kept is not None and f"the previous checkpoint {kept} is kept" in line
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["path"] == kept.name
    safe_load.load(kept / "state.pt")  # whole and readable


def test_score_says_its_real_reason_and_exhaustion_names_the_domain():
    from trainer.config import ConfigError
    from trainer.curriculum.scores import _pick_checkpoint
    from trainer.data.sampler import DataExhausted, DomainSampler

    ckpts = [Path(f"/x/step_{s:08d}") for s in (10, 100)]
    with pytest.raises(ConfigError, match="no checkpoint near step 50 of the proxy's 100"):
        _pick_checkpoint(ckpts, "0.5", 100, "early")
    sampler = DomainSampler([100, 3], shard_size=20, seed=0, exhaustion="stop", names=["code", "legal"])
    with pytest.raises(DataExhausted, match="domain 'legal' has 3 samples left in its first epoch"):
        sampler.plan_shard(np.array([0.5, 0.5]))
