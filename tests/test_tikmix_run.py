"""TiKMiX in real training runs: stage measurements through the trainer's probe batch (every target
set and every domain's held-out slice), weights.json from the last stage, and bit-exact resume
across a crash."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, losses_by_step, make_shardset, tiny_values

SCRIPT = REPO / "tests" / "scripts" / "run_config.py"
MIXTURES = {
    "tikmix_d": {"name": "tikmix_d", "stage_tokens": 384, "sequences_per_domain": 4},
    # a smaller surrogate search than the defaults: the test is about the run, not the search's accuracy
    "tikmix_m": {
        "name": "tikmix_m",
        "stage_tokens": 384,
        "sequences_per_domain": 4,
        "n_labels": 64,
        "draws": 2000,
        "top_k": 20,
    },
}


def _run(values: dict, cfg_path):
    cfg_path.write_text(json.dumps(values))
    return subprocess.run([sys.executable, str(SCRIPT), str(cfg_path)], capture_output=True, text=True, timeout=300)


def _values(data, run_dir, mixture, **extra):
    return tiny_values(
        data,
        run_dir,
        **{
            "train.steps": 11,
            "train.checkpoint_every": 4,
            "data.steps_per_shard": 2,
            "mixture": MIXTURES[mixture],
            **extra,
        },
    )


@pytest.mark.slow  # the default suite stays under 10 minutes
@pytest.mark.parametrize("mixture", sorted(MIXTURES))
def test_tikmix_run_updates_by_stage_and_resumes_bit_exactly(tmp_path, mixture):
    data = make_shardset(tmp_path / "data")
    ref = _run(_values(data, tmp_path / "ref", mixture), tmp_path / "ref.json")
    assert ref.returncode == 0, ref.stderr[-3000:]

    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "mixture/stage" in r]
    assert [r["mixture/stage"] for r in updates] == [1.0, 2.0, 3.0]  # 128 tokens a step, a stage every 3 steps
    # every task of the synthetic set was measured: its target set and the four domains' held-out slices
    assert {k for k in updates[0] if k.startswith("probe/align/")} >= {
        f"probe/align/{name}/counting"
        for name in ("target:wordy", "heldout:counting", "heldout:abc", "heldout:words", "heldout:noise")
    }
    exported = json.loads((tmp_path / "ref" / "weights.json").read_text())["train_domain_weights"]
    last = [r for r in records if "train/loss" in r][-1]
    assert exported == pytest.approx({d: last[f"mixture/learned/{d}"] for d in exported}, abs=1e-12)
    assert max(exported.values()) - min(exported.values()) > 1e-3  # the stages moved the mixture

    crashed = _run(_values(data, tmp_path / "run", mixture, **{"train.fail_at_step": 6}), tmp_path / "a.json")
    assert crashed.returncode != 0
    resumed = _run(_values(data, tmp_path / "run", mixture), tmp_path / "b.json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "ref")
    assert (tmp_path / "run" / "weights.jsonl").read_text() == (tmp_path / "ref" / "weights.jsonl").read_text()
    ref_state = json.loads((tmp_path / "ref" / "rank0.json").read_text())
    run_state = json.loads((tmp_path / "run" / "rank0.json").read_text())
    assert run_state["params_sha256"] == ref_state["params_sha256"]
