"""uniform, static and temperature controllers, and the weight-file formats users bring."""

import json

import numpy as np
import pytest
import yaml

from mixtures import MixtureConfigError, build_controller
from mixtures.base import DomainStats
from trainer.config import ConfigError
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
    (tmp_path / "doremi.json").write_text(json.dumps({"train_domain_weights": {"code": 2, "math": 1, "books": 1}, "eval_domain_weights": {}}))
    (tmp_path / "regmix.yaml").write_text(yaml.safe_dump({"train": {"code": 0.5, "math": 0.25, "books": 0.25}}))
    (tmp_path / "doge.json").write_text(json.dumps({"train_domains": "code,math,books", "train_dw": [0.5, 0.25, 0.25], "mu": 0.01}))
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
    assert megatron_blend(DOMAINS, [0.5, 0.0, 0.5], ["/d/code", "/d/math", "/d/books"]) == "0.500000 /d/code 0.500000 /d/books"
