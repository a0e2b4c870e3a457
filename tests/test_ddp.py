"""A 2-rank gloo training run: same per-step losses as one rank seeing the same global batch,
and every rank holds identical weights and parameters."""

import json

import pytest
from helpers import REPO, losses_by_step, make_shardset, run_torchrun, tiny_values

SCRIPT = REPO / "tests" / "scripts" / "run_config.py"


def test_two_ranks_match_one_rank(tmp_path):
    data = make_shardset(tmp_path / "data")
    common = {
        "train.steps": 6,
        "data.steps_per_shard": 2,
        "train.eval_every": 3,
        "mixture": {"name": "test_loss_softmax", "tau": 0.5},
    }
    one = tiny_values(data, tmp_path / "one", **{**common, "train.micro_batch": 4})
    two = tiny_values(data, tmp_path / "two", **{**common, "train.micro_batch": 2})
    (tmp_path / "one.json").write_text(json.dumps(one))
    (tmp_path / "two.json").write_text(json.dumps(two))
    for n, name in ((1, "one"), (2, "two")):
        proc = run_torchrun(n, SCRIPT, str(tmp_path / f"{name}.json"))
        assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    assert a.keys() == b.keys()
    for step in a:
        for key, va in a[step].items():
            if isinstance(va, float) and not key.startswith("train/grad_norm"):
                assert b[step][key] == pytest.approx(va, rel=1e-5, abs=1e-7), (step, key)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]  # bit-identical weights at every shard boundary
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert len({json.dumps(h["weights"]) for h in ranks[0]["history"]}) > 1
