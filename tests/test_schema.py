"""The config's one source of truth: the dataclasses as Hydra's schema, the YAML files setting only
what differs, and command-line knobs checked against their fields before Hydra composes."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from trainer import schema
from trainer.config import Config, ConfigError, load_config

CONF = Path(__file__).resolve().parents[1] / "trainer" / "conf"


def _compose(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    schema.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=overrides)
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    return values


def test_the_composed_defaults_are_the_dataclass_defaults():
    cfg = load_config(_compose(["run.name=x"]))
    expect = Config()
    for section in ("model", "data", "train", "engine", "probe", "curriculum"):
        assert getattr(cfg, section) == getattr(expect, section), section


def test_controllers_knobs_come_from_their_config_classes():
    from mixtures.base import REGISTRY

    doge = _compose(["mixture=doge", "run.name=x"])["mixture"]
    defaults = {f.name: f.default for f in dataclasses.fields(REGISTRY["doge"].Config)}
    assert doge == {**defaults, "name": "doge"}
    assert _compose(["mixture=temperature", "run.name=x"])["mixture"]["temperature"] == 2.0  # what the YAML sets


def test_no_yaml_file_repeats_a_default():
    """A group file (not an experiment or study preset, which override other groups) sets only
    values that differ from the dataclass defaults."""
    sections = schema.sections()
    repeated = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        text = path.read_text()
        if rel.parts[0] in ("experiment", "study", "hydra"):
            continue
        values = yaml.safe_load(text) or {}
        if len(rel.parts) == 1 or "@package _global_" in text:
            items = {k: v for k, v in values.items() if k in sections}
        elif rel.parts[0] in sections:
            items = {rel.parts[0]: values}
        else:
            continue
        for section, knobs in items.items():
            default = sections[section]()
            hints = typing.get_type_hints(sections[section])
            for k, v in knobs.items():
                if k in hints and not dataclasses.is_dataclass(hints[k]) and k != "name":
                    d = getattr(default, k)
                    if v == (list(d) if isinstance(d, tuple) else d):
                        repeated.append(f"{rel}: {section}.{k}")
    assert not repeated, repeated


def test_command_line_knobs_are_checked_against_their_fields():
    assert schema.normalise(["train.steps=8.0", "train.lr=1e-3"]) == ["train.steps=8", "train.lr=1e-3"]
    untouched = ["-m", "train.seed=0,1", "model=small", "+experiment=search", "mixture.mu=0.04", "~train.lr"]
    assert schema.normalise(untouched) == untouched  # flags, sweeps, groups, controllers' knobs, deletions
    refused = {
        "train.steps=7.5": "train.steps=7.5 must be an integer",
        "train.foo=1": "unknown knob(s) train.foo; allowed: ",
        "engine.deepspeed.zero_stage=x": "engine.deepspeed.zero_stage='x' must be an integer",
        "engine.zero_stage=2": "unknown knob(s) engine.zero_stage (it is now engine.deepspeed.zero_stage)",
        "engine.ds_config=1": "engine.ds_config (it is now engine.deepspeed.ds_config)",
    }
    for override, message in refused.items():
        with pytest.raises(ConfigError) as e:
            schema.normalise([override])
        assert message in str(e.value), (override, str(e.value))


def test_an_engines_knobs_are_refused_for_another_engine():
    with pytest.raises(ConfigError, match=r"engine\.deepspeed\.zero_stage applies to engine\.name=deepspeed only"):
        load_config(_compose(["engine.deepspeed.zero_stage=2", "run.name=x"]))
    cfg = load_config(_compose(["engine=deepspeed", "engine.deepspeed.zero_stage=2", "run.name=x"]))
    assert cfg.engine.deepspeed.zero_stage == 2 and cfg.engine.tensor_parallel == 1
