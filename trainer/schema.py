"""The config dataclasses as Hydra's structured schema, and command-line overrides checked against
them before Hydra composes anything.

``trainer/conf/config.yaml`` starts its defaults list with ``mixtrain_schema`` (:class:`Config`,
registered here), so every knob's type and default come from ``trainer/config.py`` alone: the YAML
files set only what differs, and OmegaConf refuses a value of the wrong type while composing.
:func:`normalise` runs first on the overrides: it refuses an unknown knob or a value of the wrong
type with the one-line message ``load_config`` would give (naming the knob and what it accepts),
and writes the accepted spellings OmegaConf is stricter about in their canonical form (``8.0``
steps is 8), so the command line means what it meant before the schema.
"""

from __future__ import annotations

import dataclasses
import re
import typing

from mixtures import REGISTRY

from .config import Config, ConfigError, typed

SCHEMA = "mixtrain_schema"
MIXTURE_SCHEMAS = "schema/mixture"
MOVED = {"engine.deepspeed.precision": "engine.precision"}
"""Knobs that moved to another section: the refusal of the old name names the new one."""
_KNOB = re.compile(r"^[+~]{0,2}[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z0-9_.]+=")


def register() -> None:
    """Store :class:`Config` as ``mixtrain_schema`` and each controller's knobs as
    ``schema/mixture/<name>`` (its Config's fields and defaults, typed Any: the controller validates
    its own knobs and names them), so ``trainer/conf/mixture/<name>.yaml`` only selects it
    (``/schema/mixture/<name>@_here_``) and sets what differs."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=SCHEMA, node=Config)
    for name, controller in REGISTRY.items():
        store.store(group=MIXTURE_SCHEMAS, name=name, node=mixture_schema(name, controller.Config))


def mixture_schema(name: str, config: type):
    """A dataclass with the controller config's fields and defaults (``name`` set to ``name``)."""
    fields = []
    for f in dataclasses.fields(config):
        if f.name == "name":
            default = dataclasses.field(default=name)
        elif f.default_factory is not dataclasses.MISSING:
            default = dataclasses.field(default_factory=f.default_factory)
        else:
            value = f.default
            mutable = isinstance(value, (list, dict, tuple))
            default = (
                dataclasses.field(default_factory=lambda v=value: list(v) if isinstance(v, tuple) else v)
                if mutable
                else dataclasses.field(default=value)
            )
        fields.append((f.name, typing.Any, default))
    return dataclasses.make_dataclass(f"{config.__name__}Schema", fields)


def sections() -> dict[str, type]:
    """The typed sections of the config (``train`` -> TrainConfig, …); ``mixture`` is a free mapping
    its controller validates."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def _field(path: list[str]):
    """The dataclass field a dotted knob path names (None: not a typed knob, e.g. a key inside a
    mapping knob or a controller's knob), or a ConfigError for a name no section has."""
    cls, seen = Config, []
    for part in path:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(seen)
            moved = [
                f"{where}.{n}.{part}"
                for n, t in hints.items()
                if dataclasses.is_dataclass(t) and part in {f.name for f in dataclasses.fields(t)}
            ]
            old = ".".join([*seen, part])
            moved = [MOVED[old]] if old in MOVED else moved
            hint = f" (it is now {moved[0]})" if moved else ""
            raise ConfigError(f"unknown knob(s) {where}.{part}{hint}; allowed: {', '.join(sorted(fields))}")
        seen.append(part)
        if not dataclasses.is_dataclass(hints[part]):
            return fields[part] if len(seen) == len(path) else None
        cls = hints[part]
    return None  # a whole section (a mapping given at once): load_config checks it


def normalise(overrides: list[str]) -> list[str]:
    """``overrides`` with every typed knob's ``a.b[.c]=value`` checked against its field (sweeps,
    group choices, deletions, controllers' knobs and keys inside mapping knobs are left to Hydra and
    to the checks at load)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    typed_sections = sections()
    # only key=value overrides of a section's knob: Hydra's flags (-m, --cfg job, …) pass through
    candidates = [o for o in overrides if _KNOB.match(o)]
    parsed = dict(zip(candidates, OverridesParser.create().parse_overrides(candidates)))
    out = []
    for text in overrides:
        o = parsed.get(text)
        path = o.key_or_group.split(".") if o is not None else []
        if o is None or path[0] not in typed_sections or o.type == OverrideType.DEL:
            out.append(text)
            continue
        field = _field(path)
        if field is None or o.is_sweep_override():
            out.append(text)
            continue
        value = o.value()
        if isinstance(value, str) and "${" in value:  # an interpolation: resolved, then checked by load_config
            out.append(text)
            continue
        canonical = typed(o.key_or_group, field.type, value)
        if type(canonical) is int and type(value) is float:  # OmegaConf refuses 8.0 for an integer
            text = f"{'+' if o.type == OverrideType.ADD else ''}{o.key_or_group}={canonical}"
        out.append(text)
    return out
