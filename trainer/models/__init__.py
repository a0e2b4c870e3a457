"""Model registry: ``model.name`` -> builder taking a resolved ModelConfig."""

from __future__ import annotations

from ..config import ConfigError, ModelConfig
from .gpt import GPT, frozen_token_losses, token_losses
from .llama import Llama

MODELS = {"gpt": GPT, "llama": Llama}


def build_model(cfg: ModelConfig):
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name={cfg.name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[cfg.name](cfg)


__all__ = ["MODELS", "build_model", "token_losses", "frozen_token_losses", "GPT", "Llama"]
