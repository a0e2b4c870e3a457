"""Bad input gets a clear error naming the knob, and leaves existing runs and checkpoints untouched."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import make_shardset, tiny_config, tiny_values

from mixtures import MixtureConfigError
from trainer.checkpoint import CheckpointMismatch
from trainer.config import ConfigError, load_config
from trainer.loop import run


def _tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete run with checkpoints; every bad-input test points at it and must not change it."""
    root = tmp_path_factory.mktemp("bad")
    data = make_shardset(root / "data")
    run_dir = root / "run"
    run(tiny_config(data, run_dir, **{"train.steps": 4, "train.checkpoint_every": 2}))
    return data, run_dir


def _expect(finished_run, exc, match, **overrides):
    data, run_dir = finished_run
    before = _tree_digest(run_dir)
    with pytest.raises(exc, match=match):
        run(load_config(tiny_values(data, run_dir, **overrides)))
    assert _tree_digest(run_dir) == before, "a rejected run modified the existing run directory"


def test_missing_data_path(finished_run, tmp_path):
    _expect(finished_run, ConfigError, r"data\.path=.*does not exist", **{"data.path": str(tmp_path / "nope")})


def test_missing_megatron_prefix(finished_run, tmp_path):
    _expect(
        finished_run,
        ConfigError,
        r"data\.prefixes\.web\.train",
        **{"data.source": "prefixes", "data.path": None, "data.prefixes": {"web": str(tmp_path / "web")}},
    )


def test_empty_domain(finished_run, tmp_path):
    import numpy as np

    from trainer.data.indexed import write_indexed

    write_indexed(tmp_path / "tiny", [np.array([1, 2, 256], dtype=np.uint16)], dtype=np.uint16)
    _expect(
        finished_run,
        ConfigError,
        r"domain 'tiny' is empty",
        **{
            "data.source": "prefixes",
            "data.path": None,
            "data.tokenizer": "bytes",
            "data.prefixes": {"tiny": str(tmp_path / "tiny")},
        },
    )


@pytest.mark.parametrize(
    "weights,match",
    [
        ({"abc": -0.1, "counting": 0.5, "noise": 0.3, "words": 0.3}, r"mixture\.weights contains negative"),
        ({"abc": float("nan"), "counting": 0.5, "noise": 0.3, "words": 0.3}, r"mixture\.weights contains NaN"),
        ([0.5, 0.5], r"mixture\.weights has 2 entries but there are 4 domains"),
        (
            {"abc": 0.5, "counting": 0.5, "noise": 0.0, "words": 0.0, "latin": 0.1},
            r"mixture\.weights names unknown domains \['latin'\]",
        ),
        ({"abc": 1.0}, r"mixture\.weights gives no weight for domains"),
        ({"abc": 0.0, "counting": 0.0, "noise": 0.0, "words": 0.0}, r"mixture\.weights sums to zero"),
    ],
)
def test_bad_static_weights(finished_run, weights, match):
    _expect(finished_run, MixtureConfigError, match, mixture={"name": "static", "weights": weights})


def test_unknown_domain_in_data_domains(finished_run):
    _expect(finished_run, ConfigError, r"data\.domains names unknown \['latin'\]", **{"data.domains": ["abc", "latin"]})


def test_unknown_controller(finished_run):
    _expect(finished_run, MixtureConfigError, r"mixture\.name='dogee'.*allowed", mixture={"name": "dogee"})


def test_unknown_knob(finished_run):
    with pytest.raises(ConfigError, match=r"unknown knob\(s\) train\.lrr"):
        load_config(tiny_values(*finished_run, **{"train.lrr": 1.0}))


def test_vocab_larger_than_model(finished_run):
    _expect(
        finished_run,
        ConfigError,
        r"model\.vocab_size=100 is smaller than the data tokenizer's vocabulary 257",
        **{"model.vocab_size": 100},
    )


def test_vocab_checked_on_bare_prefixes(finished_run, tmp_path):
    import numpy as np

    from trainer.data.indexed import write_indexed

    write_indexed(tmp_path / "big", [np.arange(400, dtype=np.uint16) % 300], dtype=np.uint16)
    _expect(
        finished_run,
        ConfigError,
        r"holds token id 299, beyond the 257 ids of its tokenizer .*model\.vocab_size=280",
        **{
            "data.source": "prefixes",
            "data.path": None,
            "data.tokenizer": "bytes",
            "model.vocab_size": 280,
            "data.prefixes": {"big": str(tmp_path / "big")},
        },
    )


def test_sequence_longer_than_context(finished_run):
    _expect(
        finished_run,
        ConfigError,
        r"data\.seq_len=128 exceeds the model's context model\.max_seq_len=64",
        **{"data.seq_len": 128},
    )


def test_checkpoint_from_different_config(finished_run):
    _expect(finished_run, CheckpointMismatch, r"model\.d_model: checkpoint 32 vs now 48", **{"model.d_model": 48})


def test_weights_from_missing_file(finished_run, tmp_path):
    _expect(
        finished_run,
        ConfigError,
        r"mixture\.weights_from=.*no such file",
        mixture={"name": "static", "weights_from": str(tmp_path / "none.json")},
    )


def test_bad_knob_values_name_the_knob():
    for overrides, match in [
        ({"train.steps": 0}, r"train\.steps=0"),
        ({"model.n_head": 3}, r"model\.n_head=3 must divide"),
        ({"data.exhaustion": "wrap"}, r"data\.exhaustion='wrap'"),
        ({"engine.backend": "mpi"}, r"engine\.backend='mpi'"),
        ({"train.min_lr": 1.0}, r"train\.min_lr=1\.0"),
        ({"run.wandb": "cloud"}, r"run\.wandb='cloud'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(tiny_values(Path("/nonexistent"), Path("/nonexistent"), **overrides))


def test_resume_from_incomplete_checkpoint_is_refused(finished_run, tmp_path):
    bogus = tmp_path / "step_00000002"
    bogus.mkdir()
    _expect(
        finished_run,
        ConfigError,
        r"train\.resume=.*is not a readable checkpoint: no meta\.json",
        **{"train.resume": str(bogus)},
    )


def test_interrupted_checkpoint_is_never_latest(finished_run, tmp_path):
    """A save that died before its rename leaves a *.tmp directory that resume ignores."""
    from trainer import checkpoint

    _, run_dir = finished_run
    root = run_dir / "checkpoints"
    latest = checkpoint.latest(root)
    debris = root / "step_00000099.tmp"
    debris.mkdir()
    (debris / "state.pt").write_bytes(b"partial")
    try:
        assert checkpoint.latest(root) == latest
        assert json.loads((root / "latest.json").read_text())["path"] == latest.name
    finally:
        shutil.rmtree(debris)
