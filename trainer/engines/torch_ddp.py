"""PyTorch DDP engine: gloo on CPU, NCCL on GPU; AdamW; accumulation with ``no_sync``."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import dist
from ..config import EngineConfig, ModelConfig, TrainConfig
from ..models import build_model, token_losses
from .base import Engine, MicroBatch, register


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
        self.wrapped = DDP(self.model) if dist.active() else self.model
        self.optimizer = adamw(self.model, train_cfg)

    def forward_backward(
        self, micro_batches: list[MicroBatch], loss_weights: torch.Tensor, num_domains: int, probe=None, on_losses=None
    ):
        sums, counts, tokens_per_rank, lw = self._step_buffers(micro_batches, loss_weights, num_domains)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not isinstance(self.wrapped, DDP) else self.wrapped.no_sync()
            recording = probe.micro_batch(mb.domains) if probe is not None else contextlib.nullcontext()
            tokens, doms = mb.tokens.to(self.device), mb.domains.to(self.device)
            with sync, recording:
                losses = token_losses(self.wrapped, tokens)  # [b, T]
                objective = (losses * lw[doms].unsqueeze(1)).sum() / tokens_per_rank
                objective.backward()
            if on_losses is not None:
                train = mb.domains < num_domains
                on_losses(tokens[train.to(tokens.device)], mb.domains[train], losses.detach()[train.to(tokens.device)])
            self._add_losses(sums, counts, mb.domains, losses)
        return sums, counts

    def optimizer_step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.train_cfg.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
