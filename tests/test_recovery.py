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
    reference = run(
        tiny_config(
            data,
            tmp_path / "ref",
            **MODEL,
            **{
                "train.steps": 60,
                "train.lr": 5e-3,
                "train.micro_batch": 8,
                "mixture": {"name": "static", "weights": only_words},
            },
        )
    )
    result = run(
        tiny_config(
            data,
            tmp_path / "doremi",
            **MODEL,
            **{
                "train.steps": 30,
                "train.lr": 5e-3,
                "train.micro_batch": 8,
                "mixture": {"name": "doremi", "reference": str(reference.run_dir)},
            },
        )
    )
    excess = _mean_by_domain(tmp_path / "doremi", "mixture/excess_loss", result.domains)
    words = result.domains.index("words")
    assert int(np.argmax(excess)) == words, excess
    assert int(np.argmax(result.average_weights)) == words, result.average_weights
    assert result.average_weights[words] > 0.5


def test_doge_starves_the_random_token_domain(data, tmp_path):
    result = run(
        tiny_config(
            data,
            tmp_path / "doge",
            **MODEL,
            **{
                "train.steps": 120,
                "train.lr": 5e-3,
                "train.micro_batch": 8,
                "mixture": {"name": "doge", "ref_sequences": 8},
            },
        )
    )
    noise = result.domains.index("noise")
    assert result.final_weights[noise] < 0.10, dict(zip(result.domains, result.final_weights))


def test_dga_moves_weight_onto_the_domain_the_target_comes_from(data, tmp_path):
    result = run(
        tiny_config(
            data,
            tmp_path / "dga",
            **MODEL,
            **{
                "train.steps": 60,
                "train.lr": 5e-3,
                "train.micro_batch": 8,
                "data.steps_per_shard": 2,
                "mixture": {
                    "name": "dga",
                    "target": "target:words_target",
                    "update_every": 2,
                    "probe_sequences": 4,
                    "target_sequences": 8,
                },
            },
        )
    )
    words = result.domains.index("words")
    assert result.final_weights[words] > 0.5, dict(zip(result.domains, result.final_weights))


def test_pike_moves_weight_off_the_high_variance_noise_domain(data, tmp_path):
    """Random printable characters: the largest per-sequence gradient variance for the least mean
    gradient (nothing beyond character frequencies to learn), so PiKE's noise term outweighs its
    descent term there at every update."""
    result = run(
        tiny_config(
            data,
            tmp_path / "pike",
            **MODEL,
            **{
                "train.steps": 60,
                "train.lr": 5e-3,
                "train.micro_batch": 8,
                "data.steps_per_shard": 2,
                "mixture": {"name": "pike", "update_every": 2},
            },
        )
    )
    var = _mean_by_domain(tmp_path / "pike", "probe/grad_var", result.domains)
    noise = result.domains.index("noise")
    weights = dict(zip(result.domains, result.final_weights))
    assert int(np.argmin(result.final_weights)) == noise, weights
    assert result.final_weights[noise] < 0.10, (weights, var)
