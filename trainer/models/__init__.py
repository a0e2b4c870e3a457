"""Model registry: ``model.name`` -> builder taking a resolved ModelConfig."""

from __future__ import annotations

from ..config import ConfigError, ModelConfig
from .gpt import GPT, frozen_token_losses, token_losses

MODELS = {"gpt": GPT}


def build_model(cfg: ModelConfig):
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name={cfg.name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[cfg.name](cfg)


def load_frozen(cfg: ModelConfig, ckpt, device):
    """The model of a mixtrain checkpoint directory, in eval mode with gradients off (a reference or
    scoring model that is read, never trained)."""
    from .. import checkpoint

    model = build_model(cfg)
    state, _, _ = checkpoint.load(ckpt, rank=0)
    model.load_state_dict(state["engine"]["model"])
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = ["MODELS", "build_model", "load_frozen", "token_losses", "frozen_token_losses", "GPT"]
