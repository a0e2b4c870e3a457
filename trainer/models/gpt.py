"""A GPT-2-shaped decoder: pre-norm blocks, scaled-dot-product attention, learned positions,
optionally tied input embedding and LM head. Sizes from a CPU-sized tiny model to GPT-2 350M come
from ``trainer/conf/model/``. Its Linear, Embedding and LayerNorm layers are the probe-aware subclasses of
``layers.py``: stock modules unless a ``trainer.probe.Probe`` records a micro-batch."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .decoder import Decoder
from .layers import Embedding, LayerNorm, Linear, PositionEmbedding


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = Linear(cfg.d_model, cfg.hidden, bias=cfg.bias)
        self.proj = Linear(cfg.hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(Decoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.wte = Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = PositionEmbedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._finish_init(residual_out=("proj.weight",))

    def embedding_table(self) -> nn.Parameter:
        return self.wte.weight

    def embed(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos)), ()


def token_losses(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, T] of a [B, T+1] batch (inputs = [:, :-1], targets = [:, 1:])."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none").view(
        batch.shape[0], -1
    )


@torch.inference_mode()
def frozen_token_losses(model: Decoder, batch: torch.Tensor) -> torch.Tensor:
    """``token_losses`` of a model that is read, never trained (DoReMi's reference, curriculum
    scorers), with the logits in one buffer kept on the model between calls and the cross-entropy
    taken in place (log Σ exp after subtracting the row maximum). The [B·T, vocab] logits of a 50k
    vocabulary are ~0.8 GB per 4k tokens; allocated afresh every call, and then the softmax's copy
    of them, their pages are faulted in each time (measured: 2.5 s vs 2.0 s for the whole forward
    of model=small on 32 x 128 tokens). Equal to ``token_losses`` to fp32 rounding."""
    h = model.ln_f(model.hidden(batch[:, :-1])).flatten(0, 1)
    weight = model.lm_head.weight
    n = h.shape[0] * weight.shape[0]
    buf = getattr(model, "_logits_buffer", None)
    if buf is None or buf.numel() < n or buf.dtype != h.dtype or buf.device != h.device:
        buf = model._logits_buffer = torch.empty(n, dtype=h.dtype, device=h.device)
    logits = torch.mm(h, weight.T, out=buf[:n].view(h.shape[0], -1))
    picked = logits.gather(1, batch[:, 1:].reshape(-1, 1)).squeeze(1).float()
    top = logits.max(dim=1, keepdim=True).values
    log_sum = logits.sub_(top).exp_().sum(dim=1).float().log_() + top.squeeze(1).float()
    return (log_sum - picked).view(batch.shape[0], -1)
