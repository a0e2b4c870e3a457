"""A Llama-style decoder: RMSNorm pre-norm blocks, rotary position embeddings (the rotate-half
layout of Hugging Face's Llama and megatron-core, so weights map one to one), a SwiGLU MLP,
grouped-query attention, no biases, tied or untied head. Sizes from ``model=llama_tiny`` (CPU) to
``llama_1b`` in ``trainer/conf/model/``. Every parameter sits in a probe-aware layer (``layers.py``):
the RMSNorm gains, the three linears of the gated MLP and the q/k/v/o projections of attention, so
the probe splits all of them by domain; the rotary tables are buffers, not parameters."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .decoder import Decoder
from .layers import Embedding, Linear, RMSNorm


def rotary_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim] of the rotary embedding: frequency theta^(-2i/hd) for the
    pair (i, i + hd/2), as Llama's rotate-half layout pairs them."""
    hd = cfg.d_model // cfg.n_head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, heads, T, hd] with tables [T, hd]."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + turned * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.d_model // cfg.n_head
        self.q = Linear(cfg.d_model, self.n_head * self.hd, bias=False)
        self.k = Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.v = Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.o = Linear(self.n_head * self.hd, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.n_kv != self.n_head:  # each key/value head serves n_head / n_kv query heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Linear(cfg.d_model, cfg.hidden, bias=False)
        self.up = Linear(cfg.d_model, cfg.hidden, bias=False)
        self.down = Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Llama(Decoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.bias:
            raise ValueError("model.name=llama has no biases: set model.bias=false")
        self.tok = Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg)
        # not persistent: rebuilt from the config, so checkpoints hold parameters only
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._finish_init(residual_out=("attn.o.weight", "mlp.down.weight"))

    def embedding_table(self) -> nn.Parameter:
        return self.tok.weight

    def embed(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        T = idx.shape[1]
        return self.drop(self.tok(idx)), (self.rope_cos[:T], self.rope_sin[:T])
