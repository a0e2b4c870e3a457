"""Probe-aware Linear, Embedding, LayerNorm and RMSNorm.

With no probe recording they ARE the stock torch modules: subclasses with the same parameters,
initialisation, state_dict keys and forward code; the only addition is one attribute read and one
call frame per forward.
While a probe records a micro-batch (``trainer.probe.Probe.micro_batch``), their forward runs a
custom autograd Function whose backward computes each weight gradient as a sum of per-domain pieces
(gradient-probe.md §2, route M): the rows of a micro-batch are sorted by domain, so every domain owns
one contiguous block of token rows, and G = Σ_j D_jᵀ X_j. The pieces are handed to the probe, and
their sum is what autograd receives, so the probe adds no weight-gradient FLOPs; the result equals
the stock gradient up to fp32 summation order.

A layer talks to the probe through a ``Recording`` (the probe's per-micro-batch object): it asks
where the domain blocks start and hands over dense pieces (``[k, *param.shape]``, one per present
domain) or, for embeddings, sparse rows (token ids and their output-gradient rows).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


class Recording(Protocol):
    """What a probe provides to the layers while it records one micro-batch."""

    sequences: int
    """Rows b of the [b, T] micro-batch."""
    train_groups: int
    """How many of the present groups (the first ones, rows being sorted) are training domains;
    the others are reference rows, whose pieces go to the probe but never into the gradient."""

    def slot(self, param: torch.Tensor | None):
        """An opaque key for a trainable parameter (None for a frozen or absent one)."""

    def bounds(self, rows: int) -> list[int]:
        """Token-row offsets [k + 1] of the k present domains in a flattened [rows, ...] activation."""

    def chunk(self, numel: int) -> int:
        """How many domains' dense pieces of a ``numel``-sized parameter to materialise at once."""

    def workspace(self, k: int, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised [k, *shape] buffer (dtype and device of ``like``) for one chunk of pieces,
        valid until the layer's backward returns."""

    def note_rows(self, slot, ids: torch.Tensor) -> None:
        """An embedding lookup of table rows ``ids`` in the forward (tied weights' cross terms need them)."""

    def dense(self, slot, first: int, pieces: torch.Tensor) -> None:
        """pieces[j] is the gradient piece of present domain ``first + j``."""

    def rows(self, slot, ids: torch.Tensor, values: torch.Tensor, bounds: list[int]) -> None:
        """Embedding pieces: present domain j's gradient is the scatter-add of values[b[j]:b[j+1]] into the
        table rows ids[b[j]:b[j+1]] (b = bounds)."""


class Tap:
    """The switch shared by the probe-aware layers of one model: ``current`` is None (stock code) or
    the Recording of the micro-batch being probed. ``on`` mirrors ``current is not None`` as a plain
    bool: that is all a compiled layer reads (torch.compile guards on its value, two graphs at most),
    while the Recording itself is only touched by the eager, probed path."""

    __slots__ = ("current", "on")

    def __init__(self) -> None:
        self.current: Recording | None = None
        self.on = False

    def set(self, rec: Recording | None) -> None:
        self.current, self.on = rec, rec is not None

    @contextlib.contextmanager
    def recording(self, rec: Recording | None):
        """``rec`` for the duration of the block, then the previous value (activation checkpointing's
        recomputed forward runs under the Recording its first forward saw)."""
        before = self.current
        self.set(rec)
        try:
            yield
        finally:
            self.set(before)


OFF = Tap()
"""The tap of layers no probe is attached to; never switched on."""


class ProbeAware:
    """Mixin: ``_tap`` is replaced by a probe's own Tap when a probe attaches to the model.

    A layer's ``forward`` takes the stock path unless ``_tap.on``; the probed path is ``_probed``,
    which :func:`keep_probed_paths_eager` excludes from torch.compile, so a compiled model breaks
    its graph at each probe-aware layer on probed micro-batches only."""

    _tap: Tap = OFF


def keep_probed_paths_eager() -> None:
    """Exclude every probe-aware layer's probed path from torch.compile: its autograd Function hands
    pieces to the probe, a side effect a graph cannot hold. Call it before compiling a model made of
    these layers (``Decoder.configure`` does). Not done at import: ``torch.compiler.disable``
    imports torch._dynamo, ~2.5 s of start-up in every process that never compiles."""
    pending = list(ProbeAware.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        own = cls.__dict__.get("_probed")
        if own is not None and not getattr(own, "_torchdynamo_disable", False):
            cls._probed = torch.compiler.disable(own)


def tap_of(module: nn.Module) -> Tap:
    """The Tap of a module's probe-aware layers (OFF when none is attached)."""
    for m in module.modules():
        if isinstance(m, ProbeAware):
            return m._tap
    return OFF


def checkpointed(block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    """``block(x, *args)`` with its activations recomputed in the backward (non-reentrant
    torch.utils.checkpoint). The recomputation replays the forward under the Recording the first
    forward ran with, so a probed block saves the same tensors again and its probed backward sees
    them."""
    tap = tap_of(block)
    rec = tap.current

    def run(inp, *rest):
        with tap.recording(rec):
            return block(inp, *rest)

    return torch.utils.checkpoint.checkpoint(run, x, *args, use_reentrant=False)


def segment_sums(rows: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """[k, ...] sums of the row blocks rows[b[j]:b[j+1]] (b = bounds). A loop of plain sums: deterministic on every
    device (index_add_ is not on CUDA) and, on CPU, ~10x faster than torch.segment_reduce."""
    return torch.stack([rows[s:e].sum(0) for s, e in zip(bounds[:-1], bounds[1:])])


def _vector_grad(rec: Recording, slot, rows: torch.Tensor) -> torch.Tensor:
    """Gradient of a vector parameter whose stock gradient is ``rows.sum(0)`` (biases, LayerNorm
    gain/bias): per-domain block sums go to the probe, their sum to autograd."""
    pieces = segment_sums(rows.float(), rec.bounds(rows.shape[0]))
    rec.dense(slot, 0, pieces)
    return pieces[: rec.train_groups].sum(0)


def _segmented_weight_grad(rec: Recording, slot, shape: torch.Size, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_j dy_jᵀ x_j over the training domains' blocks; the pieces (reference rows' too) are
    materialised a chunk of domains at a time so the transient stays within the probe's budget, and
    each chunk is handed over before it is summed. The pieces are in the compute dtype (bf16 under
    autocast: each GEMM accumulates in fp32 and rounds once, as the stock backward's single GEMM
    does); they are summed in fp32, so the gradient rounds once more at most, not once per domain."""
    bounds = rec.bounds(x.shape[0])
    k, train = len(bounds) - 1, rec.train_groups
    step = rec.chunk(shape.numel())
    total = None
    for lo in range(0, k, step):
        hi = min(k, lo + step)
        pieces = rec.workspace(hi - lo, shape, dy)
        for j in range(lo, hi):
            s, e = bounds[j], bounds[j + 1]
            torch.mm(dy[s:e].T, x[s:e], out=pieces[j - lo])
        rec.dense(slot, lo, pieces)
        if lo < train:
            part = pieces[: train - lo].sum(0, dtype=torch.float32)
            total = part if total is None else total.add_(part)
    return total if total is not None else dy.new_zeros(shape, dtype=torch.float32)


class _LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with the weight and bias gradients split by domain in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, rec: Recording):
        ctx.save_for_backward(x, weight)
        ctx.rec = rec
        ctx.slots = (rec.slot(weight), rec.slot(bias))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        rec, (w_slot, b_slot) = ctx.rec, ctx.slots
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        # Compute in the output gradient's dtype (bf16 under autocast, as the stock backward would).
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_x = dy @ weight.to(dy.dtype) if need_x else None
        grad_w = grad_b = None
        if need_w:
            x2 = x.reshape(-1, x.shape[-1]).to(dy.dtype)
            grad_w = _segmented_weight_grad(rec, w_slot, weight.shape, dy2, x2)
        if need_b:
            grad_b = _vector_grad(rec, b_slot, dy2)
        return grad_x, grad_w, grad_b, None


class _EmbeddingFn(torch.autograd.Function):
    """Row lookup whose weight gradient is also handed to the probe as per-domain sparse rows."""

    @staticmethod
    def forward(ctx, ids, weight, rec: Recording):
        ctx.save_for_backward(ids)
        ctx.rec, ctx.slot, ctx.shape = rec, rec.slot(weight), weight.shape
        rec.note_rows(ctx.slot, ids)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        ids = ids.reshape(-1)
        rows = dy.reshape(ids.numel(), -1)
        if not ctx.needs_input_grad[1]:
            return None, None, None
        bounds = ctx.rec.bounds(ids.numel())
        ctx.rec.rows(ctx.slot, ids, rows, bounds)
        n = bounds[ctx.rec.train_groups]  # the training rows come first; reference rows stay out
        # The stock kernel: the table's gradient is bit-identical to an unprobed embedding's.
        return None, torch.ops.aten.embedding_dense_backward(rows[:n], ids[:n], ctx.shape[0], -1, False), None


class _AffineFn(torch.autograd.Function):
    """y = x̂ ⊙ w + b (the affine half of a LayerNorm) with w and b's gradients split by domain."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, rec: Recording):
        ctx.save_for_backward(xhat, weight)
        ctx.rec = rec
        ctx.slots = (rec.slot(weight), rec.slot(bias))
        return xhat * weight if bias is None else torch.addcmul(bias, xhat, weight)

    @staticmethod
    def backward(ctx, dy):
        xhat, weight = ctx.saved_tensors
        rec, (w_slot, b_slot) = ctx.rec, ctx.slots
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_x = dy * weight if need_x else None
        grad_w = _vector_grad(rec, w_slot, dy2 * xhat.reshape(dy2.shape)) if need_w else None
        grad_b = _vector_grad(rec, b_slot, dy2) if need_b else None
        return grad_x, grad_w, grad_b, None


class Linear(ProbeAware, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._probed(x) if self._tap.on else super().forward(x)

    def _probed(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.bias, self._tap.current)


class Embedding(ProbeAware, nn.Embedding):
    """Token embedding; the probed path is a plain lookup (no padding_idx, max_norm or sparse
    gradients, which the models do not use)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._probed(ids) if self._tap.on else super().forward(ids)

    def _probed(self, ids: torch.Tensor) -> torch.Tensor:
        return _EmbeddingFn.apply(ids, self.weight, self._tap.current)


class PositionEmbedding(Embedding):
    """Learned position table, looked up with positions [T] and broadcast over the batch. While
    probed the lookup is expanded to [b, T] so that its gradient still has one row per token, which
    the domain split needs (the stock path sums over the batch before the table sees it)."""

    def _probed(self, pos: torch.Tensor) -> torch.Tensor:
        rec = self._tap.current
        return _EmbeddingFn.apply(pos.expand(rec.sequences, -1), self.weight, rec)


class LayerNorm(ProbeAware, nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._probed(x) if self._tap.on and self.weight is not None else super().forward(x)

    def _probed(self, x: torch.Tensor) -> torch.Tensor:
        xhat = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return _AffineFn.apply(xhat, self.weight, self.bias, self._tap.current)


class RMSNorm(ProbeAware, nn.RMSNorm):
    """x / rms(x) ⊙ g; while probed the gain's gradient is split by domain (the normalisation has no
    parameter, so it runs as the stock functional)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._probed(x) if self._tap.on and self.weight is not None else super().forward(x)

    def _probed(self, x: torch.Tensor) -> torch.Tensor:
        xhat = F.rms_norm(x, self.normalized_shape, None, self.eps)
        return _AffineFn.apply(xhat, self.weight, None, self._tap.current)
