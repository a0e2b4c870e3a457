"""The Hydra command line: a run through `mixtrain train`, a -m sweep, and torchrun ranks agreeing
on one run directory."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, TINY_CLI, make_shardset

TINY = TINY_CLI


def _mixtrain(args, cwd, nproc=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "trainer.cli",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "trainer.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("cli") / "data")


def test_train_writes_the_run_directory(tmp_path, data):
    _mixtrain(
        [
            "train",
            *TINY,
            f"data.path={data}",
            "mixture=temperature",
            "mixture.temperature=2",
            "run.name=t1",
            "run.wandb=offline",
        ],
        tmp_path,
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("t1-")
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "weights.jsonl",
        "weights.json",
        "blend.txt",
        "weights.png",
        "losses.png",
        "wandb_id.txt",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "checkpoints" / "step_00000004" / "meta.json").is_file()
    weights = json.loads((run_dir / "weights.json").read_text())
    assert set(weights["train_domain_weights"]) == {"abc", "counting", "noise", "words"}
    assert weights["controller"] == "temperature"
    keys = set().union(*(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()))
    assert {
        "train/loss/abc",
        "mixture/weight/abc",
        "mixture/tokens/abc",
        "eval/abc/loss",
        "eval/loss",
        "eval/macro_loss",
        "target/wordy/loss",
    } <= keys
    blend = (run_dir / "blend.txt").read_text().split()
    assert len(blend) == 8 and blend[1].endswith("abc/train")


def test_multirun_sweep(tmp_path, data):
    _mixtrain(
        [
            "train",
            "-m",
            *TINY,
            f"data.path={data}",
            "run.wandb=disabled",
            "run.plots=false",
            "mixture=uniform,temperature",
            "hydra.sweep.dir=sweep",
        ],
        tmp_path,
    )
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2
    controllers = sorted(json.loads((j / "weights.json").read_text())["controller"] for j in jobs)
    assert controllers == ["temperature", "uniform"]


def test_torchrun_ranks_agree_on_the_run_directory(tmp_path, data):
    _mixtrain(
        ["train", *TINY, f"data.path={data}", "run.wandb=disabled", "run.plots=false", "run.name=ddp"],
        tmp_path,
        nproc=2,
    )
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # no second timestamped directory from rank 1
    assert (runs[0] / "weights.json").is_file()
    assert (
        json.loads((runs[0] / "checkpoints" / "step_00000004" / "meta.json").read_text())["fingerprint"]["world_size"]
        == 2
    )


def test_a_refusal_on_two_ranks_is_one_line_from_rank_0(tmp_path, data):
    """Both ranks refuse alike (nothing trains, nothing is written) and the message is printed once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.cli"]
    args = ["train", *TINY, f"data.path={data}", "run.wandb=disabled", "train.fail_at_step=2", "train.fail_rank=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "mixtrain: error:" in line]
    assert len(said) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert said[0].endswith("mixtrain: error: train.fail_rank=5 names no rank of this 2-rank job")
    assert not (tmp_path / "runs").exists()  # Hydra's folder of the refused launch is gone on every rank


def test_help_lists_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0 and "mixtrain data ingest" in proc.stdout and "mixtrain train" in proc.stdout


def test_train_help_lists_every_group_and_option():
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0 and proc.stdout.startswith("mixtrain train [group=option")
    section = proc.stdout.split("== Config groups (group=option) ==")[1].split("==")[0]
    groups = dict(
        line.split(": ", 1)
        for line in section.splitlines()
        if line.split(":")[0] in ("mixture", "engine", "model", "curriculum", "study")
    )
    for group, options in groups.items():
        on_disk = sorted(p.stem for p in (REPO / "trainer" / "conf" / group).glob("*.yaml"))
        assert options.split(", ") == on_disk, group
    assert len(groups) == 5 and "tikmix_m" in groups["mixture"]
