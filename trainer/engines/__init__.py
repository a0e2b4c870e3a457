"""Engine registry (``engine.name``), and what works on any engine's checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import checkpoint, safe_load
from ..config import ConfigError, EngineConfig, ModelConfig
from . import (
    deepspeed_engine,  # noqa: F401  (registers "deepspeed"; imports DeepSpeed only when built)
    fsdp_engine,  # noqa: F401  (registers "fsdp")
    megatron_engine,  # noqa: F401  (registers "megatron"; imports megatron-core only when built)
    torch_ddp,  # noqa: F401  (registers "torch")
)
from .base import ENGINES, Engine, MicroBatch

PLAIN = "torch"
"""The engine whose checkpoints carry no ``engine`` entry in meta.json (the plain layout)."""


FORMAT_DEFAULTS = {"precision": "fp32"}
"""meta.json ``engine`` entries that older checkpoints lack, with the value they were written with
(engine=megatron recorded no precision before it had bf16)."""


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ConfigError(f"engine.name={name!r}; allowed: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]


def build_engine(cfg) -> Engine:
    return engine_class(cfg.engine.name)(cfg.engine, cfg.model, cfg.train)


def checkpoint_format(engine_cfg) -> dict | None:
    """meta.json's ``engine`` entry for this engine configuration (None: the plain layout)."""
    return engine_class(engine_cfg.name).checkpoint_format(engine_cfg)


def format_of(meta: dict) -> type[Engine]:
    """The engine class whose format a checkpoint's meta.json names."""
    name = (meta.get("engine") or {}).get("name", PLAIN)
    if name not in ENGINES:
        raise checkpoint.DamagedCheckpoint(f"meta.json names an unknown engine format {name!r}")
    return ENGINES[name]


def check_engine_format(path: Path, saved: dict | None, current: dict | None) -> None:
    """Refuse a checkpoint written by another engine layout (naming the knobs that differ)."""
    saved = saved or {"name": PLAIN}
    now = current or {"name": PLAIN}
    if saved.get("name") == now.get("name"):  # an entry a format gained later reads as its old value
        saved = {**{k: v for k, v in FORMAT_DEFAULTS.items() if k in now}, **saved}
    if saved == now:
        return

    shared = {f.name for f in dataclasses.fields(EngineConfig)}  # engine.name, engine.precision, ...

    def knob(k: str) -> str:  # an engine's own knobs live under engine.<its name>
        return f"engine.{k}" if k in shared else f"engine.{(saved if k in saved else now)['name']}.{k}"

    diffs = [
        f"{knob(k)}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    raise checkpoint.CheckpointMismatch(
        f"checkpoint {path} was written by another engine layout; differing knobs:\n  "
        + "\n  ".join(diffs)
        + "\nresume with the same engine knobs, or use train.resume=replace (moves the old run aside) or another "
        "run.dir to start fresh"
    )


def read_checkpoint(path: Path, rank: int = 0) -> tuple[dict, dict, dict | None]:
    """(state, meta, this rank's RNG state or None) of any engine's checkpoint, without a process
    group: ``state["engine"]["model"]`` holds the full fp32 model weights."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"train.resume={str(path)!r} is not a complete checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    state = format_of(meta).read_checkpoint(path, meta)
    rng_path = path / f"rng_rank{rank}.pt"
    return state, meta, safe_load.load(rng_path) if rng_path.is_file() else None


def load_frozen(cfg: ModelConfig, ckpt, device):
    """The model of a mixtrain checkpoint directory, in eval mode with gradients off (a reference or
    scoring model that is read, never trained)."""
    from ..models import build_model

    state, meta, _ = read_checkpoint(ckpt)
    names = format_of(meta).weight_names
    if names != "mixtrain":
        raise ConfigError(
            f"{ckpt} holds {names}'s model (engine={meta['engine']['name']}), which mixtrain's models do not "
            "load: take a reference or scoring model from a run of another engine"
        )
    model = build_model(cfg)
    model.load_state_dict(state["engine"]["model"])
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = [
    "ENGINES",
    "Engine",
    "MicroBatch",
    "build_engine",
    "check_engine_format",
    "checkpoint_format",
    "engine_class",
    "format_of",
    "load_frozen",
    "read_checkpoint",
]
