"""Engine registry (``engine.name``)."""

from __future__ import annotations

from ..config import ConfigError
from . import (
    deepspeed_engine,  # noqa: F401  (registers "deepspeed"; imports DeepSpeed only when built)
    megatron_engine,  # noqa: F401  (registers "megatron"; imports megatron-core only when built)
    torch_ddp,  # noqa: F401  (registers "torch")
)
from .base import ENGINES, Engine, MicroBatch


def build_engine(cfg) -> Engine:
    if cfg.engine.name not in ENGINES:
        raise ConfigError(f"engine.name={cfg.engine.name!r}; allowed: {', '.join(sorted(ENGINES))}")
    return ENGINES[cfg.engine.name](cfg.engine, cfg.model, cfg.train)


__all__ = ["ENGINES", "Engine", "MicroBatch", "build_engine"]
