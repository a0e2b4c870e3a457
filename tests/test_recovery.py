"""Controllers recover the known answer on synthetic domains, in real training runs of a tiny GPT.

Four domains with the bytes tokenizer: "counting" (number sequences), "abc" (a repeated pattern),
"words" (a 9-word vocabulary) and "noise" (uniformly random printable characters: unlearnable).
"""

import numpy as np
import pytest

from helpers import make_shardset, tiny_config
from trainer.loop import run
from trainer.tracking import read_jsonl

MODEL = {"model.d_model": 48, "model.n_layer": 2, "model.n_head": 2, "train.eval_every": 0, "data.eval_sequences": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    targets = {"counting_target": "counting", "words_target": "words"}
    return make_shardset(root / "data", n_docs=80, targets=targets)


def _mean_by_domain(run_dir, key, domains):
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    return np.array([np.nanmean([r.get(f"{key}/{d}", np.nan) for r in records]) for d in domains])


def test_doremi_upweights_the_domain_with_the_largest_excess_loss(data, tmp_path):
    # A reference that has only seen "words" is far better than the fresh proxy there and no better
    # elsewhere (excess clipped at 0): "words" has by far the largest excess loss.
    only_words = {"abc": 0, "counting": 0, "noise": 0, "words": 1}
    reference = run(tiny_config(data, tmp_path / "ref", **MODEL, **{
        "train.steps": 60, "train.lr": 5e-3, "train.micro_batch": 8, "mixture": {"name": "static", "weights": only_words}}))
    result = run(tiny_config(data, tmp_path / "doremi", **MODEL, **{
        "train.steps": 30, "train.lr": 5e-3, "train.micro_batch": 8,
        "mixture": {"name": "doremi", "reference": str(reference.run_dir)}}))
    excess = _mean_by_domain(tmp_path / "doremi", "mixture/excess_loss", result.domains)
    words = result.domains.index("words")
    assert int(np.argmax(excess)) == words, excess
    assert int(np.argmax(result.average_weights)) == words, result.average_weights
    assert result.average_weights[words] > 0.5
