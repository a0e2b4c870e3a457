"""`mixtrain study` on planted data: the oracle from the planted manifest, the table's paired
differences and checks on hand-made conditions, and the whole study end to end (--quick) on a
planted set built from a tiny shard set: proxies (DoReMi after its reference), the Dirichlet draws
ranked on proxies, one Hydra multirun over every condition, the table and its checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, make_shardset
from trainer.commands import planted as planted_data
from trainer.commands.compare import RunInfo
from trainer.commands.paired import SEQUENCES
from trainer.commands.study import Analysis, Condition, Planted, analyse, checks, dirichlet_draws, render

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.max_seq_len=64",
    "data.seq_len=16",
    "data.steps_per_shard=3",
    "data.eval_sequences=8",
    "train.steps=6",
    "train.micro_batch=14",
    "train.warmup_steps=1",
    "train.eval_every=3",
    "run.progress=false",
]
PLANTED = Planted(
    path=Path("."),
    domains=["a", "b", "b_dup", "noise_1"],
    real=["a", "b"],
    duplicate={"domain": "b", "copy": "b_dup"},
    noise=["noise_1"],
)


def test_dirichlet_draws_are_a_pure_function_of_the_seed():
    a = dirichlet_draws(["x", "y", "z"], 4, seed=3)
    assert a == dirichlet_draws(["x", "y", "z"], 4, seed=3)
    assert a != dirichlet_draws(["x", "y", "z"], 4, seed=4)
    for w in a:
        assert list(w) == ["x", "y", "z"] and abs(sum(w.values()) - 1) < 1e-12 and min(w.values()) > 0


def test_the_oracle_splits_the_duplicated_share_and_skips_noise():
    assert PLANTED.oracle() == {"a": 0.5, "b": 0.25, "b_dup": 0.25, "noise_1": 0.0}
    assert PLANTED.noise_weight({"a": 0.3, "b": 0.3, "b_dup": 0.2, "noise_1": 0.2}) == pytest.approx(0.2)


def _run(tmp: Path, name: str, seed: int, shift: float, weights: dict, humaneval: float, rng) -> RunInfo:
    path = tmp / f"{name}{seed}"
    path.mkdir()
    base = {
        "eval/a/loss": 5 + rng.normal(0, 0.3, 40),
        "eval/b/loss": 6 + rng.normal(0, 0.3, 40),
        "target/humaneval/loss": 7 + rng.normal(0, 0.3, 40),
    }
    groups = {
        k: v + (humaneval if k.startswith("target") else shift) + rng.normal(0, 0.01, v.size) for k, v in base.items()
    }
    np.savez(path / SEQUENCES, **groups)
    return RunInfo(
        path=path,
        arg=str(path),
        label=name,
        config={"train": {"seed": seed}},
        domains=["a", "b"],
        targets=["humaneval"],
        eval_step=6,
        losses={},
        target_losses={"humaneval": 7 + humaneval},
        eval_loss=None,
        curves={},
        tokens={},
        weights=weights,
        trajectory=None,
        train_seconds=1.0,
        wall_seconds=60.0,
        overrides=[f"+study={name}", f"train.seed={seed}"],
    )


def test_table_and_checks_on_known_conditions(tmp_path):
    """Conditions with known shifts on identical evaluation sequences: the paired differences come
    out as built, DoGE recovers 80% of the oracle's gain, and the checks say met/missed rightly."""
    shifts = {
        "uniform": (0.0, 0.0, 0.25),
        "oracle": (-0.10, 0.0, 0.0),
        "unimax": (0.0, 0.0, 0.25),
        "temperature": (0.001, 0.0, 0.2),
        "doge": (-0.08, 0.0, 0.01),
        "doremi": (-0.02, 0.0, 0.2),
        "dga_humaneval": (0.0, -0.05, 0.1),
    }
    runs = []
    for seed in (1, 2, 3):
        for name, (shift, humaneval, noise) in shifts.items():
            weights = {"a": 0.4, "b": 0.3, "b_dup": 0.3 - noise, "noise_1": noise}
            runs.append(_run(tmp_path, name, seed, shift, weights, humaneval, np.random.default_rng(seed)))
    analysis = analyse(tmp_path, runs, PLANTED)
    assert analysis.vs_uniform["oracle"].mean == pytest.approx(-0.10, abs=0.003)
    assert analysis.recovered("doge") == pytest.approx(0.8, abs=0.05)
    table = render(analysis)
    assert table.splitlines()[2].startswith("| 1 | oracle |")
    lines = checks(analysis)
    assert any(line.startswith("noise weight of doge: 0.010") and line.endswith("**met**") for line in lines)
    assert any(line.startswith("noise weight of doremi: 0.200") and line.endswith("**missed**") for line in lines)
    assert any(line.startswith("doge recovers 80%") and line.endswith("**met**") for line in lines)
    assert any(line.startswith("doremi recovers 20%") and line.endswith("**missed**") for line in lines)
    assert any(
        line.startswith("a learned mixture beats unimax and temperature")
        and "doge" in line
        and line.endswith("**met**")
        for line in lines
    )
    assert any(line.startswith("DGA → humaneval") and line.endswith("**met**") for line in lines)
    assert isinstance(analysis, Analysis) and isinstance(analysis.conditions["doge"], Condition)


def test_unknown_condition_names_the_allowed_ones(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "study", "--out", str(tmp_path), "--conditions", "uniform,best"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "--conditions best; allowed: uniform, oracle" in proc.stderr


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    # no "abc" domain: a BPE of 300 ids compresses its repeated alphabet to nothing
    kinds = {"counting": "counting", "words": "words", "noise": "noise", "digits": "counting"}
    source = make_shardset(tmp_path / "source", kinds=kinds, targets={"humaneval": "words"}, n_docs=60)
    data = planted_data.build_planted(
        source, tmp_path / "cache", vocab_size=300, noise_tokens=20_000, duplicate="words", quiet=True
    )
    out = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "trainer.cli",
        "study",
        "--quick",
        "--out",
        str(out),
        "--data",
        str(data),
        "--random",
        "2",
        "--random-steps",
        "3",
        "--jobs",
        "2",
        *TINY,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    oracle = json.loads((out / "oracle.json").read_text())
    assert oracle["noise_1"] == oracle["noise_2"] == 0 and oracle["words"] == oracle["words_dup"] == 1 / 8
    # DoReMi ran after (and on) its uniform reference; the draws were ranked on proxies
    for name in ("doremi", "doremi_eta01", "doge", "doge_mix", "tikmix_d"):
        assert json.loads((out / "proxies" / name / "weights.json").read_text())["train_domain_weights"]
    draws = [json.loads((out / "proxies" / "random" / f"draw_{k}.json").read_text()) for k in range(2)]
    assert json.loads((out / "proxies" / "random_best.json").read_text()) in draws
    # one multirun: every condition, one seed (--quick), each a finished run with its per-sequence evaluation
    jobs = sorted(p for p in (out / "main").iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 13 and all((j / "weights.json").is_file() and (j / SEQUENCES).is_file() for j in jobs)
    table = (out / "study.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    names = {r.split(" | ")[1] for r in rows}
    assert len(rows) == 13 and names >= {"uniform", "oracle", "dga_humaneval", "pike", "rnb"}
    assert "noise weight of doge" in table and "DGA → humaneval" in table
    assert (out / "compare.md").is_file() and (out / "study_delta.png").is_file()
    # a second call finds everything finished and only redoes the comparison
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "finished already" in again.stdout
    assert "all 13 runs finished already" in again.stdout
