"""What the decoder families share: initialisation, the block stack (with optional activation
checkpointing) and the LM head. A family defines its blocks, its input embedding (``embed``) and the
final norm ``ln_f``; ``hidden``/``head`` are the interface ``token_losses``, ``frozen_token_losses``
and the probe's reference passes use."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from .layers import Linear, checkpointed, keep_probed_paths_eager


class Decoder(nn.Module):
    blocks: nn.ModuleList
    ln_f: nn.Module
    lm_head: Linear

    activation_checkpointing = False
    """Recompute each block in the backward (set by the engine from engine.activation_checkpointing)."""
    autocast_dtype: torch.dtype | None = None
    """The forward's autocast dtype (bf16 for engine.precision=bf16 on the torch engine), None = off."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved before building the model")
        self.cfg = cfg

    def _finish_init(self, residual_out: tuple[str, ...]) -> None:
        """N(0, 0.02) for matrices and embeddings, zero biases; the residual stream's output
        projections (names ending in ``residual_out``) scaled by 1/sqrt(2 * n_layer) so its variance
        does not grow with depth (GPT-2; torchtitan's Llama does the same by depth)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embedding_table()
        self.apply(_init)
        for name, p in self.named_parameters():
            if name.endswith(residual_out):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    def embedding_table(self) -> nn.Parameter:
        raise NotImplementedError

    def embed(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The blocks' input [B, T, d] and the extra arguments every block takes."""
        raise NotImplementedError

    def configure(self, engine_cfg, autocast: bool = True) -> None:
        """Apply the engine's compute knobs: bf16 autocast (``autocast``: the engine casts no other
        way), activation checkpointing, and torch.compile of each block (torchtitan's granularity:
        one graph per block, reused by every layer; the embeddings and head stay eager)."""
        self.autocast_dtype = torch.bfloat16 if autocast and engine_cfg.precision == "bf16" else None
        self.activation_checkpointing = bool(engine_cfg.activation_checkpointing)
        if engine_cfg.compile:
            keep_probed_paths_eager()
            for block in self.blocks:
                block.compile()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T]."""
        if self.autocast_dtype is None:  # no autocast of its own: an ambient one (the caller's) still applies
            return self.head(self.hidden(idx))
        with torch.autocast(idx.device.type, dtype=self.autocast_dtype):
            return self.head(self.hidden(idx))

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, T, d] for token ids [B, T]."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x, extra = self.embed(idx)
        for block in self.blocks:
            x = checkpointed(block, x, *extra) if self.activation_checkpointing else block(x, *extra)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states x [..., d]."""
        return self.lm_head(self.ln_f(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
