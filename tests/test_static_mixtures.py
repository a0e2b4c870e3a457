"""uniform, static, temperature and UniMax controllers, and the weight-file formats users bring."""

import json
import warnings

import numpy as np
import pytest
import yaml
from helpers import make_shardset, tiny_config

from mixtures import MixtureConfigError, build_controller
from mixtures.base import DomainStats
from trainer.config import ConfigError
from trainer.data.domains import load_data
from trainer.loop import Loop
from trainer.weights_io import megatron_blend, read_weights, write_weights

DOMAINS = ["code", "math", "books"]


def test_uniform():
    c = build_controller("uniform", DOMAINS, {})
    assert np.allclose(c.weights, 1 / 3) and not c.adaptive and np.allclose(c.loss_weights, 1)


def test_temperature_by_hand():
    tokens = np.array([900.0, 100.0, 400.0])
    c = build_controller("temperature", DOMAINS, {"temperature": 2.0}, domain_tokens=tokens)
    expected = np.sqrt(tokens) / np.sqrt(tokens).sum()  # 30, 10, 20 -> 0.5, 1/6, 1/3
    assert np.allclose(c.weights, [0.5, 1 / 6, 1 / 3]) and np.allclose(c.weights, expected)
    natural = build_controller("temperature", DOMAINS, {"temperature": 1.0}, domain_tokens=tokens)
    assert np.allclose(natural.weights, tokens / tokens.sum())
    sharp = build_controller("temperature", DOMAINS, {"temperature": 0.01}, domain_tokens=np.array([1e7, 2e7, 3e7]))
    assert np.isfinite(sharp.weights).all() and sharp.weights.argmax() == 2


def test_temperature_rejects_bad_t():
    with pytest.raises(MixtureConfigError, match=r"mixture\.temperature=0"):
        build_controller("temperature", DOMAINS, {"temperature": 0}, domain_tokens=np.ones(3))


def test_static_normalises_and_floors():
    c = build_controller("static", DOMAINS, {"weights": {"code": 2, "math": 0, "books": 2}, "floor": 0.3})
    assert np.allclose(c.weights, 0.7 * np.array([0.5, 0, 0.5]) + 0.1)
    c.observe(DomainStats(step=0, lr=1e-3, loss=np.ones(3), tokens=np.ones(3)))
    assert np.allclose(c.average_weights, c.weights)


def test_static_needs_weights():
    with pytest.raises(MixtureConfigError, match="mixture.weights or mixture.weights_from"):
        build_controller("static", DOMAINS, {})


def test_weight_file_formats(tmp_path):
    (tmp_path / "doremi.json").write_text(
        json.dumps({"train_domain_weights": {"code": 2, "math": 1, "books": 1}, "eval_domain_weights": {}})
    )
    (tmp_path / "regmix.yaml").write_text(yaml.safe_dump({"train": {"code": 0.5, "math": 0.25, "books": 0.25}}))
    (tmp_path / "doge.json").write_text(
        json.dumps({"train_domains": "code,math,books", "train_dw": [0.5, 0.25, 0.25], "mu": 0.01})
    )
    (tmp_path / "plain.json").write_text(json.dumps({"code": 0.5, "math": 0.25, "books": 0.25}))
    run = tmp_path / "run"
    run.mkdir()
    write_weights(run / "weights.json", DOMAINS, [0.5, 0.25, 0.25], [0.4, 0.3, 0.3], "doge", 100)
    for src in ("doremi.json", "regmix.yaml", "doge.json", "plain.json", "run"):
        w = read_weights(tmp_path / src)
        c = build_controller("static", DOMAINS, {"weights": w})
        assert np.allclose(c.weights, [0.5, 0.25, 0.25]), src
    (tmp_path / "bad.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ConfigError, match="no domain weights found"):
        read_weights(tmp_path / "bad.json")


def test_megatron_blend_string():
    assert (
        megatron_blend(DOMAINS, [0.5, 0.0, 0.5], ["/d/code", "/d/math", "/d/books"])
        == "0.500000 /d/code 0.500000 /d/books"
    )


def _water_fill(sizes, budget, epochs):
    """UniMax as the level lam with sum(min(N n_i, lam)) = B, found by bisection: the same answer as
    the paper's smallest-first loop, reached another way, so a slip in one does not hide in both."""
    caps = epochs * np.asarray(sizes, dtype=np.float64)
    lo, hi = 0.0, float(budget)
    for _ in range(200):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if np.minimum(caps, lam).sum() < budget else (lo, lam)
    alloc = np.minimum(caps, hi)
    return alloc / alloc.sum()


def test_unimax_by_hand():
    sizes = np.array([10000.0, 100.0, 1000.0])  # not sorted, so the smallest-first order is exercised
    # N=1, B=3000: the 100-token domain takes its 100; 2900 / 2 = 1450 > 1000, so the 1000-token domain is
    # capped too and the largest takes the remaining 1900.
    c = build_controller("unimax", DOMAINS, {"epochs": 1, "budget_tokens": 3000}, domain_tokens=sizes)
    assert np.allclose(c.allocation, [1900, 100, 1000])
    assert np.allclose(c.weights, [1900 / 3000, 100 / 3000, 1000 / 3000])
    # N=2: caps 200 / 2000; 200 is taken, then 2800 / 2 = 1400 is under 2000, so the rest split evenly.
    c2 = build_controller("unimax", DOMAINS, {"epochs": 2, "budget_tokens": 3000}, domain_tokens=sizes)
    assert np.allclose(c2.allocation, [1400, 200, 1400]) and np.allclose(c2.weights, np.array([1400, 200, 1400]) / 3000)
    for cc in (c, c2):
        assert not cc.adaptive and np.allclose(cc.loss_weights, 1)
        assert np.allclose(cc.weights, _water_fill(sizes, cc.budget, cc.cfg.epochs))
    # Fractional N: caps 50 / 500 / 5000 of B=3000 -> 50, 500, 2450.
    half = build_controller("unimax", DOMAINS, {"epochs": 0.5, "budget_tokens": 3000}, domain_tokens=sizes)
    assert np.allclose(half.allocation, [2450, 50, 500])


def test_unimax_uniform_when_budget_is_small():
    sizes = np.array([1e6, 2e6, 3e6])
    c = build_controller("unimax", DOMAINS, {"budget_tokens": 3000}, domain_tokens=sizes)
    assert np.allclose(c.weights, 1 / 3) and np.allclose(c.allocation, 1000)


def test_unimax_all_capped_is_natural_proportions():
    sizes = np.array([100.0, 300.0, 600.0])
    with pytest.warns(RuntimeWarning, match=r"every domain is capped.*each domain sees 5 epochs"):
        c = build_controller("unimax", DOMAINS, {"epochs": 2, "budget_tokens": 5000}, domain_tokens=sizes)
    assert np.allclose(c.allocation, 2 * sizes) and np.allclose(c.weights, sizes / sizes.sum())
    # Exactly N x all the data fits: every domain is at its cap, but nothing is over-asked, so no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = build_controller("unimax", DOMAINS, {"epochs": 2, "budget_tokens": 2000}, domain_tokens=sizes)
    assert np.allclose(exact.weights, sizes / sizes.sum())


def test_unimax_uses_run_budget_unless_given():
    sizes = np.array([10000.0, 100.0, 1000.0])
    from_run = build_controller("unimax", DOMAINS, {}, domain_tokens=sizes, run_tokens=3000)
    assert from_run.budget == 3000 and np.allclose(from_run.allocation, [1900, 100, 1000])
    override = build_controller("unimax", DOMAINS, {"budget_tokens": 300}, domain_tokens=sizes, run_tokens=3000)
    assert override.budget == 300 and np.allclose(override.weights, 1 / 3)


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"epochs": 0}, r"mixture\.epochs=0 must be > 0"),
        ({"epochs": -1.5}, r"mixture\.epochs=-1\.5 must be > 0"),
        ({"epochs": float("inf")}, r"mixture\.epochs=inf must be > 0 and finite"),
        ({"epochs": float("nan")}, r"mixture\.epochs=nan must be > 0 and finite"),
        ({"epochs": "one"}, r"mixture\.epochs='one' must be > 0"),
        ({"epochs": True}, r"mixture\.epochs=True must be > 0"),
        ({"budget_tokens": 0}, r"mixture\.budget_tokens=0 must be a token count > 0"),
        ({"budget_tokens": -5}, r"mixture\.budget_tokens=-5 must be a token count > 0"),
        ({"budget_tokens": "lots"}, r"mixture\.budget_tokens='lots' must be a token count"),
        ({"floor": 0.1}, r"unknown knob\(s\) mixture\.floor"),
    ],
)
def test_unimax_rejects_bad_knobs(knobs, match):
    with pytest.raises(MixtureConfigError, match=match):
        build_controller("unimax", DOMAINS, knobs, domain_tokens=np.ones(3), run_tokens=100)


def test_unimax_needs_budget_and_token_counts():
    with pytest.raises(MixtureConfigError, match=r"needs a token budget: set mixture\.budget_tokens"):
        build_controller("unimax", DOMAINS, {}, domain_tokens=np.ones(3))
    with pytest.raises(MixtureConfigError, match="needs the domains' token counts"):
        build_controller("unimax", DOMAINS, {"budget_tokens": 100})
    with pytest.raises(MixtureConfigError, match="positive token count"):
        build_controller("unimax", DOMAINS, {"budget_tokens": 100}, domain_tokens=np.array([5.0, 0.0, 5.0]))
    with pytest.raises(MixtureConfigError, match="2 token counts for 3 domains"):
        build_controller("unimax", DOMAINS, {"budget_tokens": 100}, domain_tokens=np.ones(2))


def test_unimax_run_uses_its_own_budget(tmp_path):
    data = make_shardset(tmp_path / "data")
    base = tiny_config(data, tmp_path / "unused", **{"train.steps": 4})
    sizes = load_data(base.data, quiet=True).train_tokens
    budget = base.train.steps * base.train.micro_batch * base.data.seq_len  # one rank, grad_accum 1
    # A cap just under the even share for the smallest domain: it is capped and its leftover moves to the
    # others, so the weights depend on this run's budget (far below the caps they would be uniform).
    epochs = float(0.9 * budget / len(sizes) / sizes.min())
    expected = _water_fill(sizes, budget, epochs)
    assert not np.allclose(expected, 1 / len(sizes))
    assert np.isclose(expected.min() * budget, epochs * sizes.min())
    assert (expected * budget < epochs * sizes - 1e-6).sum() >= 2  # the larger domains stay under their caps
    cfg = tiny_config(data, tmp_path / "run", **{"train.steps": 4, "mixture": {"name": "unimax", "epochs": epochs}})
    result = Loop(cfg).train()
    assert result.step == 4 and np.allclose(result.final_weights, expected)
    saved = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert saved["controller"] == "unimax"
    assert list(saved["train_domain_weights"]) == load_data(cfg.data, quiet=True).domains
    for key in ("train_domain_weights", "final_domain_weights"):
        assert np.allclose(list(saved[key].values()), expected, atol=1e-9), key
