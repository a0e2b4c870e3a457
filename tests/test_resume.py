"""Bit-exact resume: a run killed mid-shard and resumed gives the same per-step losses, weights
and final parameters as an uninterrupted run, on 1 and 2 ranks."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, losses_by_step, make_shardset, run_torchrun, tiny_values

SCRIPT = REPO / "tests" / "scripts" / "run_config.py"


def _launch(nproc: int, values: dict, cfg_path):
    cfg_path.write_text(json.dumps(values))
    if nproc == 1:
        return subprocess.run([sys.executable, str(SCRIPT), str(cfg_path)], capture_output=True, text=True, timeout=300)
    return run_torchrun(nproc, SCRIPT, str(cfg_path))


def _values(data, run_dir, nproc, **extra):
    return tiny_values(
        data,
        run_dir,
        **{
            "train.steps": 10,
            "train.checkpoint_every": 3,
            "train.eval_every": 5,
            "train.micro_batch": 4 // nproc,
            "train.grad_accum": 2,
            "data.steps_per_shard": 4,
            "mixture": {"name": "test_loss_softmax", "tau": 0.5},
            **extra,
        },
    )


@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.slow), 2])  # 2 ranks covers 1 in the default suite
def test_resume_after_crash_is_bit_exact(tmp_path, nproc):
    data = make_shardset(tmp_path / "data")
    ref = _launch(nproc, _values(data, tmp_path / "ref", nproc), tmp_path / "ref.json")
    assert ref.returncode == 0, ref.stderr[-3000:]

    crashed = _launch(nproc, _values(data, tmp_path / "run", nproc, **{"train.fail_at_step": 7}), tmp_path / "a.json")
    assert crashed.returncode != 0  # os._exit(17) on every rank
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "step_00000006" in ckpts and "step_00000009" not in ckpts
    resumed = _launch(nproc, _values(data, tmp_path / "run", nproc), tmp_path / "b.json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 6" in resumed.stdout

    # identical per-step losses (every domain), learning rates, weights and evaluations
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "ref")
    n_lines = [len((tmp_path / d / "metrics.jsonl").read_text().splitlines()) for d in ("run", "ref")]
    assert n_lines[0] == n_lines[1]  # the steps replayed after the checkpoint were cut, not duplicated
    ref_ranks = [json.loads((tmp_path / "ref" / f"rank{r}.json").read_text()) for r in range(nproc)]
    run_ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert run_ranks[0]["history"] == ref_ranks[0]["history"]
    assert run_ranks[0]["params_sha256"] == ref_ranks[0]["params_sha256"]
    # the weights moved (the test is not vacuous) and every rank used rank 0's weights
    assert len({json.dumps(h["weights"]) for h in ref_ranks[0]["history"]}) > 1
    for r in range(1, nproc):
        assert run_ranks[r]["history"] == run_ranks[0]["history"]
        assert run_ranks[r]["params_sha256"] == run_ranks[0]["params_sha256"]
    assert (tmp_path / "run" / "weights.jsonl").read_text() == (tmp_path / "ref" / "weights.jsonl").read_text()


GRADIENT_MIXERS = {
    # an update every 2 steps, the variance per sequence (one micro-batch of 4 per rank)
    "pike": {"name": "pike", "update_every": 2},
    # rounds of 4 steps: the checkpoint at step 6 holds a round open since step 4
    "rnb": {"name": "rnb", "round_steps": 4},
}


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mixer", list(GRADIENT_MIXERS))
def test_gradient_mixers_resume_bit_exact(tmp_path, mixer, nproc):
    """PiKE (per-domain norms and variances) and R&B (a gradient round open at the checkpoint) resume
    to the same losses, weights and parameters as an uninterrupted run."""
    data = make_shardset(tmp_path / "data")
    extra = {"mixture": GRADIENT_MIXERS[mixer], "train.grad_accum": 1, "train.micro_batch": 8 // nproc}
    ref = _launch(nproc, _values(data, tmp_path / "ref", nproc, **extra), tmp_path / "ref.json")
    assert ref.returncode == 0, ref.stderr[-3000:]
    crashed = _values(data, tmp_path / "run", nproc, **extra, **{"train.fail_at_step": 7})
    assert _launch(nproc, crashed, tmp_path / "a.json").returncode != 0
    resumed = _launch(nproc, _values(data, tmp_path / "run", nproc, **extra), tmp_path / "b.json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 6" in resumed.stdout
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "ref")
    ref0 = json.loads((tmp_path / "ref" / "rank0.json").read_text())
    run0 = json.loads((tmp_path / "run" / "rank0.json").read_text())
    assert run0["history"] == ref0["history"] and run0["params_sha256"] == ref0["params_sha256"]
    assert len({json.dumps(h["weights"]) for h in ref0["history"]}) > 1  # the mixture moved
    assert (tmp_path / "run" / "weights.jsonl").read_text() == (tmp_path / "ref" / "weights.jsonl").read_text()
