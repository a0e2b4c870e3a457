"""PyTorch DDP engine: gloo on CPU, NCCL on GPU; AdamW; accumulation with ``no_sync``. The model
keeps fp32 weights, gradients and optimizer state; engine.precision=bf16 runs its forward under
bf16 autocast (backward follows), engine.compile compiles each block, engine.activation_checkpointing
recomputes each block in the backward (``Decoder.configure``)."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import dist
from ..config import EngineConfig, ModelConfig, TrainConfig
from ..models import build_model, token_losses
from .base import Engine, register


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value on every rank (FSDP2's sharded parameters and norms); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)


@register("torch")
class TorchEngine(Engine):
    fuses_reference_rows = True

    def __init__(self, engine_cfg: EngineConfig, model_cfg: ModelConfig, train_cfg: TrainConfig):
        self._join(engine_cfg)
        self.train_cfg = train_cfg
        torch.manual_seed(train_cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's
        self.model = build_model(model_cfg).to(self.device)
        self.model.configure(engine_cfg)
        self.wrapped = DDP(self.model) if dist.active() else self.model
        self.optimizer = adamw(self.model, train_cfg)

    def _accumulating(self, last: bool):
        return self.wrapped.no_sync() if not last and isinstance(self.wrapped, DDP) else contextlib.nullcontext()

    def _training_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        return token_losses(self.wrapped, tokens)

    def optimizer_step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.train_cfg.grad_clip
        norm = full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf")))
        if torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def load_model_weights(self, weights: dict) -> None:
        self.model.load_state_dict(weights)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
