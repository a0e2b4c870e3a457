"""`mixtrain study` end to end on a tiny shard set: proxies (with DoReMi's dependency on its
reference), the Dirichlet draws ranked on proxies, one Hydra multirun over conditions x seeds, and
the ranking with the study's checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, make_shardset
from trainer.study import dirichlet_draws

TINY = ["model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.max_seq_len=64", "data.seq_len=32",
        "data.steps_per_shard=3", "data.eval_sequences=4", "train.steps=6", "train.micro_batch=4", "train.warmup_steps=1",
        "train.eval_every=3", "engine.threads=1", "run.progress=false"]


def test_dirichlet_draws_are_a_pure_function_of_the_seed():
    a = dirichlet_draws(["x", "y", "z"], 4, seed=3)
    assert a == dirichlet_draws(["x", "y", "z"], 4, seed=3)
    assert a != dirichlet_draws(["x", "y", "z"], 4, seed=4)
    for w in a:
        assert list(w) == ["x", "y", "z"] and abs(sum(w.values()) - 1) < 1e-12 and min(w.values()) > 0


def test_unknown_condition_names_the_allowed_ones(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "study", "--out", str(tmp_path), "--conditions", "uniform,best"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--conditions best; allowed: uniform, temperature" in proc.stderr


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    data = make_shardset(tmp_path / "data")
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "trainer.cli", "study", "--out", str(out), "--conditions", "uniform,doremi,random_best",
           "--seeds", "1,2", "--random", "2", "--random-steps", "3", "--jobs", "2", "data=shards", f"data.path={data}", *TINY]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # DoReMi ran after (and on) its uniform reference
    assert json.loads((out / "proxies" / "doremi" / "weights.json").read_text())["train_domain_weights"]
    draws = [json.loads((out / "proxies" / "random" / f"draw_{k}.json").read_text()) for k in range(2)]
    best = json.loads((out / "proxies" / "random_best.json").read_text())
    assert best in draws
    # one multirun: 3 conditions x 2 seeds, each job a finished run with its overrides
    jobs = sorted(p for p in (out / "main").iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 6 and all((j / "weights.json").is_file() for j in jobs)
    used = json.loads((jobs[-1] / "weights.json").read_text())["train_domain_weights"]  # random_best, seed 2
    assert np.allclose([used[d] for d in best], list(best.values()), atol=1e-6)
    table = (out / "study.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and {r.split(" | ")[1] for r in rows} == {"uniform", "doremi", "random_best"}
    assert all(" ± " in r for r in rows)
    assert (out / "compare.md").is_file() and (out / "compare_valid.png").is_file()
    # a second call finds everything finished and only redoes the comparison
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "all 4 finished already" in again.stdout and "all 6 runs finished already" in again.stdout
