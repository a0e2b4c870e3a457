"""megatron-core's GPTModel behind our model interface, with probe-aware tensor-parallel layers.

``build_megatron_gpt`` builds megatron's GPTModel from the same ``model.*`` knobs as our models and
wraps it in ``MegatronGPT``, whose ``forward(ids [B, T]) -> logits [B, T, V_padded]`` is what
``trainer.models.token_losses`` and ``trainer.signals`` expect. The logits are gathered over the
tensor-parallel group (``parallel_output=False``): every TP rank computes the same loss, whose
gradient with respect to its vocabulary slice is exact (the gather's backward is a split). That
costs a B·T·V all-gather instead of Megatron's vocab-parallel cross-entropy; it keeps one loss path
for training, evaluation, reference gradients and probe batches.

The families (``model.name``): ``gpt`` is GPT-2's layout (LayerNorm, GELU MLP, biases per
``model.bias``, learned absolute positions; the CPU shim covers the buffer they allocate).
``llama`` is ``trainer.models.llama``'s: RMSNorm (``model.norm_eps``), a SwiGLU MLP of width
``model.hidden`` (megatron's gated linear_fc1 holds [gate; up], split over TP with stride 2 so
every TP size trains the same model), grouped-query attention with ``model.n_kv_head`` query groups
(each TP rank holds whole groups), no biases, rotary positions (base ``model.rope_theta``, the
rotate-half layout). Both tie the head to the embedding per ``model.tie_embeddings``.

Precision: under ``bf16`` every parameter is bfloat16 (megatron's mixed precision: bf16 GEMMs,
softmax in fp32); the engine keeps the fp32 main gradients and master weights.

The probe. Megatron's activations are sequence-first ([s, b, h]), while the probe's domain blocks
are contiguous rows of a batch-first [b, s] layout. ``make_probe_aware`` swaps the classes of the
built modules (same parameters, same state_dict keys) to subclasses that, while a probe records,
run the autograd Functions of ``layers.py`` (route M: weight gradient = Σ_domains D_jᵀ X_j) on a
batch-first view of their input, around megatron's own tensor-parallel communication:

- ColumnParallelLinear: copy-to-TP-region (identity forward, all-reduce of the input gradient
  backward), the local [out/TP, in] GEMM, optional gather; its bias (sharded) is added inside;
- RowParallelLinear: the local [out, in/TP] GEMM on the parallel input, reduce over TP, then the
  (replicated) bias through a probed add;
- VocabParallelEmbedding: the local lookup of this rank's vocabulary slice, masked, reduced over TP;
- LayerNorm / RMSNorm (torch's classes, which megatron's local spec builds without Apex) and the
  learned position table (replicated): the probed affine / lookup.

The probed paths assume what ``transformer_config`` pins: no sequence parallelism (so no
reduce-scatter of embeddings) and no gradient-accumulation fusion (which would write ``main_grad``
inside the backward, past the probe).

Biases that megatron returns separately (``skip_bias_add``) are added inside the layer while probed
(the layer returns no bias, which megatron's bias-dropout-add and MLP accept), so their gradient is
split by domain too. Each rank's pieces cover its local shard; the probe sums partial products over
the TP group and counts replicated parameters on TP rank 0 only (``ParallelLayout``). Under bf16
the pieces come in bf16 and the probe sums them in fp32; class swaps and the bf16 conversion keep
every Parameter object, so the probe's slots (keyed by parameter identity) are the layers' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import Embedding, LayerNorm, ProbeAware, RMSNorm, _EmbeddingFn, _LinearFn, _vector_grad


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to ``multiple`` (engine.megatron.vocab_multiple), the same for every TP."""
    return -(-int(vocab_size) // multiple) * multiple


@dataclass
class ParallelLayout:
    """How a model's parameters are spread over ranks, for the probe and gradient clipping.

    Megatron orders ranks TP-fastest (tp-cp-ep-dp-pp): rank = dp_rank * TP + tp_rank."""

    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    tp_group: object
    dp_group: object

    @staticmethod
    def sharded(param: torch.Tensor) -> bool:
        """A tensor-parallel shard (each TP rank holds another slice); otherwise replicated."""
        return bool(getattr(param, "tensor_model_parallel", False))

    def counted_here(self, param: torch.Tensor) -> bool:
        """Whether this rank contributes ``param`` to a sum over the TP group: shards everywhere,
        replicated parameters on TP rank 0 only (they are identical on every TP rank)."""
        return self.sharded(param) or self.tp_rank == 0

    def tp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            torch.distributed.all_reduce(t, group=self.tp_group)
        return t

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            torch.distributed.all_reduce(t, group=self.dp_group)
        return t


class _BiasAddFn(torch.autograd.Function):
    """y + b with b's gradient split by domain (y batch-first)."""

    @staticmethod
    def forward(ctx, y, bias, rec):
        ctx.rec, ctx.slot = rec, rec.slot(bias)
        return y + bias

    @staticmethod
    def backward(ctx, dy):
        grad_b = _vector_grad(ctx.rec, ctx.slot, dy.reshape(-1, dy.shape[-1])) if ctx.needs_input_grad[1] else None
        return dy, grad_b, None


def _batch_first_linear(x: torch.Tensor, weight, bias, rec) -> torch.Tensor:
    """The probed GEMM on a batch-first view [b, s, in] -> sequence-first [s, b, out], contiguous:
    megatron's all-reduce (``mappings._reduce``) reduces ``t.contiguous()`` and returns ``t``, so on a
    non-contiguous tensor it would silently reduce a copy. Its input's gradient (dy @ W) is
    contiguous too, which the all-reduce in the backward of copy-to-TP-region needs."""
    return _LinearFn.apply(x, weight, bias, rec).transpose(0, 1).contiguous()


class _SeqFirst:
    """A probe-aware norm (``layers.LayerNorm``/``RMSNorm``) on megatron's sequence-first [s, b, h]
    activations: the probed path runs on the batch-first view, whose flattened rows are the domain
    blocks the gain's (and bias's) gradient is split into."""

    def _probed(self, x: torch.Tensor) -> torch.Tensor:
        return super()._probed(x.transpose(0, 1)).transpose(0, 1)


class ProbedSeqFirstLayerNorm(_SeqFirst, LayerNorm):
    pass


class ProbedSeqFirstRMSNorm(_SeqFirst, RMSNorm):
    pass


def _probed_classes():
    from megatron.core.tensor_parallel import layers as tpl
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
        scatter_to_tensor_model_parallel_region,
    )

    class ProbedColumnParallelLinear(ProbeAware, tpl.ColumnParallelLinear):
        def forward(self, input_, weight=None, runtime_gather_output=None):
            rec = self._tap.current
            if rec is None:
                return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
            x = copy_to_tensor_model_parallel_region(input_.transpose(0, 1), group=self.tp_group)
            y = _batch_first_linear(x, self.weight if weight is None else weight, self.bias, rec)
            gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
            if gather:
                y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
            return y, None

    class ProbedRowParallelLinear(ProbeAware, tpl.RowParallelLinear):
        def forward(self, input_):
            rec = self._tap.current
            if rec is None:
                return super().forward(input_)
            x = (
                input_
                if self.input_is_parallel
                else scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
            )
            y = _batch_first_linear(x.transpose(0, 1), self.weight, None, rec)
            y = reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
            if self.bias is not None:
                y = _BiasAddFn.apply(y.transpose(0, 1), self.bias, rec).transpose(0, 1)
            return y, None

    class ProbedVocabParallelEmbedding(ProbeAware, tpl.VocabParallelEmbedding):
        def forward(self, input_):
            rec = self._tap.current
            if rec is None:
                return super().forward(input_)
            ids, outside = input_, None
            if self.tp_group.size() > 1:
                outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
                ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
            out = _EmbeddingFn.apply(ids, self.weight, rec)  # ids [b, s]: batch-first rows
            if outside is not None:
                out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # row 0 then gets zero pieces
            return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)

    return {
        tpl.ColumnParallelLinear: ProbedColumnParallelLinear,
        tpl.RowParallelLinear: ProbedRowParallelLinear,
        tpl.VocabParallelEmbedding: ProbedVocabParallelEmbedding,
        nn.LayerNorm: ProbedSeqFirstLayerNorm,
        nn.RMSNorm: ProbedSeqFirstRMSNorm,  # megatron's WrappedTorchNorm builds torch's own classes
        nn.Embedding: Embedding,
    }


def make_probe_aware(module: nn.Module) -> None:
    """Swap every supported layer's class for its probe-aware subclass, in place (parameters,
    initialisation and state_dict keys unchanged). Anything else holding parameters stays, and
    ``trainer.probe.Probe`` then refuses the model naming it (e.g. Transformer Engine layers)."""
    swaps = _probed_classes()
    for m in module.modules():
        target = swaps.get(type(m))
        if target is not None:
            m.__class__ = target


def transformer_config(model: ModelConfig, tp: int, use_cpu_initialization: bool, bf16: bool):
    """megatron's TransformerConfig for these knobs. ``bf16``: megatron's mixed precision (bf16
    parameters and activations, softmax in fp32); the fp32 main gradients and master weights are the
    engine's."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    family = {}
    if model.name == "llama":
        family = {
            "normalization": "RMSNorm",
            "gated_linear_unit": True,  # SwiGLU: linear_fc1 holds the gate and up projections
            "activation_func": F.silu,
            "num_query_groups": model.kv_heads,
            # the rotate-half pairs (i, i + hd/2) of trainer.models.llama, pinned against a changed default
            "rotary_interleaved": False,
        }
    return TransformerConfig(
        num_layers=model.n_layer,
        hidden_size=model.d_model,
        num_attention_heads=model.n_head,
        ffn_hidden_size=model.hidden,
        add_bias_linear=bool(model.bias),
        layernorm_epsilon=model.norm_eps,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        init_method_std=0.02,  # GPT-2's; output projections get 0.02/sqrt(2·n_layer) (megatron's scaled init)
        # fused kernels need CUDA/apex; the unfused paths are what the probe wraps
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        **family,
    )


_COLUMN_PARALLEL = (
    "word_embeddings.weight",
    "output_layer.weight",
    "linear_qkv.weight",
    "linear_qkv.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
)
"""State-dict keys (by suffix) split over TP along dim 0: ColumnParallelLinear, VocabParallelEmbedding."""
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
"""Split along dim 1: RowParallelLinear (its bias is replicated)."""


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full weights (a TP=1 model's state dict) from the TP ranks' shards, in rank order.

    Column-parallel weights are concatenated along dim 0, row-parallel ones along dim 1, and
    replicated ones (norms, the position table, row-parallel biases) taken from rank 0. A gated
    ``linear_fc1`` (SwiGLU: [gate; up], twice linear_fc2's input width) is split with stride 2:
    each rank holds its slice of the gate and then its slice of up (megatron's
    ``_initialize_affine_weight_cpu`` hands rank r the chunks r, r + TP, ...), so the full tensor
    interleaves the ranks' halves. The query groups of ``linear_qkv`` lie whole on one rank (TP
    divides model.n_kv_head), so a plain concatenation keeps megatron's per-group layout."""
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for key, first in shards[0].items():
        parts = [s[key] for s in shards]
        if key.endswith(_ROW_PARALLEL):
            out[key] = torch.cat(parts, dim=1)
        elif key.endswith(_COLUMN_PARALLEL):
            stride = 1
            if ".linear_fc1." in key:
                fc2 = shards[0][key[: key.index(".linear_fc1.")] + ".linear_fc2.weight"]
                stride = first.shape[0] // fc2.shape[1]  # 2 when gated
            out[key] = torch.cat([p.chunk(stride)[s] for s in range(stride) for p in parts])
        else:
            out[key] = first
    return out


class MegatronGPT(nn.Module):
    """forward(ids [B, T]) -> full (TP-gathered) logits [B, T, V_padded]."""

    def __init__(self, gpt: nn.Module, max_seq_len: int, layout: ParallelLayout):
        super().__init__()
        self.gpt = gpt
        self.max_seq_len = max_seq_len
        self.parallel_layout = layout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, T = ids.shape
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.max_seq_len}")
        pos = torch.arange(T, device=ids.device).unsqueeze(0).expand(b, T)  # [b, T]: one position row per token
        causal = torch.ones(1, 1, T, T, dtype=torch.bool, device=ids.device).triu(1)  # True = masked
        return self.gpt(input_ids=ids, position_ids=pos, attention_mask=causal)


def build_megatron_gpt(
    model: ModelConfig, vocab_multiple: int, layout: ParallelLayout, use_te: bool, cpu: bool, bf16: bool = False
) -> MegatronGPT:
    """The GPTModel for these knobs (parallel_state must be initialised); call with the same
    torch seed on every rank. ``cpu``: CPU initialisation draws the full matrices, then keeps this
    rank's slice, so every TP size starts from the same weights (on GPU megatron initialises each
    shard from its tensor-parallel RNG instead). ``bf16``: every parameter in bfloat16, as megatron's
    Float16Module converts the module (its forward's casts of float inputs and outputs have nothing
    to do here: the inputs are token ids, and ``token_losses`` takes the cross-entropy in fp32)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(model, layout.tp_size, use_cpu_initialization=cpu, bf16=bf16)
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()  # TE's norms follow config.normalization
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        # Apex's fused norm (taken when Apex is installed) has no RMS variant: the spec then takes torch's
        spec = get_gpt_layer_local_spec(normalization=config.normalization)
    llama = model.name == "llama"
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab(model.vocab_size, vocab_multiple),
        max_sequence_length=model.max_seq_len,
        parallel_output=False,
        share_embeddings_and_output_weights=bool(model.tie_embeddings),
        position_embedding_type="rope" if llama else "learned_absolute",
        rotary_base=model.rope_theta,
    )
    if bf16:
        gpt.bfloat16()  # the norms: torch's classes ignore params_dtype
    make_probe_aware(gpt)
    return MegatronGPT(gpt, model.max_seq_len, layout)
