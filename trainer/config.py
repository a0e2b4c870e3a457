"""Typed run configuration. Hydra composes YAML from ``trainer/conf/``; ``load_config`` turns the result
into these dataclasses and validates every knob, naming it in the error.

Each field's docstring is the knob's documentation (``mixtrain train --help`` lists the groups).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad knob value; the message starts with the knob's dotted name."""


# Allowed values of the enumerated knobs, here with the knobs (the runtime imports them from here).
POLICIES = ("cycle", "stop", "renormalize")
"""data.exhaustion: what a domain does when its samples run out."""
SUBSETS = ("all", "main", "holdout")
"""data.subset: every sample, all but the curriculum proxy's holdout, or the holdout alone."""
TOKENIZERS = ("gpt2", "bytes")
"""data.tokenizer: the named tokenizers; any other value is the path of a local Hugging Face tokenizer."""
ORDERS = ("learnable_first", "anti")
"""curriculum.order: learnable samples first, or the reverse (an ablation)."""


@dataclass
class ModelConfig:
    name: str = "gpt"
    """Registered model family: 'gpt' (GPT-2: LayerNorm, learned positions, GELU MLP) or 'llama'
    (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases)."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 2
    """Attention heads per block (must divide d_model)."""
    d_model: int = 64
    """Residual width."""
    max_seq_len: int = 256
    """Context length: positions in the learned position table."""
    vocab_size: int | None = None
    """Vocabulary rows; null = the data tokenizer's vocabulary rounded up to a multiple of 64."""
    tie_embeddings: bool = True
    """Share the input embedding with the LM head."""
    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2 style)."""
    dropout: float = 0.0
    """Dropout on attention and residual paths (0 keeps runs deterministic)."""
    n_kv_head: int | None = None
    """llama: key/value heads of grouped-query attention (must divide model.n_head); null = n_head
    (multi-head attention)."""
    ffn_hidden: int | None = None
    """Width of the MLP's hidden layer; null = 4 x d_model (gpt) or SwiGLU's 8/3 x d_model rounded
    up to a multiple of 64 (llama, the parameter count of a 4 x d GELU MLP)."""
    rope_theta: float = 10000.0
    """llama: base of the rotary position embedding's frequencies (Llama 3 uses 500000)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else int(self.n_kv_head)

    @property
    def hidden(self) -> int:
        """The MLP's hidden width (``ffn_hidden`` resolved)."""
        if self.ffn_hidden is not None:
            return int(self.ffn_hidden)
        if self.name == "llama":
            return -(-(8 * self.d_model // 3) // 64) * 64
        return 4 * self.d_model

    def validate(self):
        for knob in ("n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, knob) <= 0:
                raise ConfigError(f"model.{knob}={getattr(self, knob)} must be positive")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.n_head={self.n_head} must divide model.d_model={self.d_model}")
        if self.n_kv_head is not None:
            if self.name != "llama":
                raise ConfigError(f"model.n_kv_head applies to model.name=llama only (model.name={self.name!r})")
            if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
                raise ConfigError(
                    f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}; allowed: "
                    f"{[d for d in range(1, self.n_head + 1) if self.n_head % d == 0]}"
                )
        if self.name == "llama" and self.bias:
            raise ConfigError("model.bias=true: model.name=llama has no biases; set model.bias=false")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise ConfigError(f"model.ffn_hidden={self.ffn_hidden} must be positive or null")
        if self.name == "llama" and (self.d_model // self.n_head) % 2:
            raise ConfigError(
                f"model.d_model / model.n_head = {self.d_model // self.n_head} must be even for rotary embeddings"
            )
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ConfigError("model.rope_theta and model.norm_eps must be positive")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be positive or null")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class DataConfig:
    source: str = "demo"
    """'demo' (the built-in 8-domain corpus, built on first use), 'path' (a shard set folder from
    `mixtrain data ingest`) or 'prefixes' (bare Megatron .bin/.idx prefixes)."""
    path: str | None = None
    """Shard set folder (source=path)."""
    prefixes: dict = field(default_factory=dict)
    """source=prefixes: domain -> prefix, or domain -> {train: prefix, valid: prefix}."""
    tokenizer: str = "gpt2"
    """Tokenizer of prefixes given directly (source=prefixes) and of the demo corpus (source=demo; a
    shard set, source=path, records its own): 'gpt2', 'bytes' or the path of a local Hugging Face
    tokenizer.json or tokenizer folder. Token ids are checked against its vocabulary."""
    eod_token: str | None = None
    """End-of-document token of a Hugging Face data.tokenizer; null: its eos_token, else
    <|endoftext|>, else </s>. It must match the EOD the data was written with."""
    domains: list | None = None
    """Subset and order of domains to train on; null = all, in the shard set's order."""
    targets: list | None = None
    """Target sets to evaluate (demo: humaneval, champ, news); null = all available."""
    seq_len: int = 128
    """Tokens per training sequence (a sample is seq_len + 1 tokens sliced from a domain's stream)."""
    steps_per_shard: int = 10
    """Optimizer steps per shard: weights change only at shard boundaries."""
    exhaustion: str = "cycle"
    """When a domain runs out: 'cycle' (reshuffle, next epoch), 'stop' (end training) or
    'renormalize' (drop the domain, spread its share over the others)."""
    eval_sequences: int = 32
    """Validation sequences per domain and per target set at each evaluation."""
    cache_dir: str | None = None
    """Where the demo corpus is built (default: $MIXTRAIN_CACHE or ./.cache/mixtrain)."""
    max_tokens_per_domain: int = 4_000_000
    """Demo corpus: cap on each domain's training tokens."""
    holdout_fraction: float = 0.0
    """Share of each domain's training samples set aside as the curriculum proxy's holdout, chosen
    per sample by a hash of (domain name, sample index) (``trainer.curriculum.holdout``; samples are
    fixed-length slices of the packed stream, not documents). 0 = no holdout; the curriculum
    groups set 0.1 (controllers reference §4.2)."""
    subset: str = "all"
    """Which training samples the sampler may draw: 'all', 'main' (everything except the holdout:
    the main run under a curriculum, which must never train on the proxy's data) or 'holdout'
    (only the holdout: the curriculum proxy, +experiment=curriculum_proxy)."""
    reference_fraction: float = 0.02
    """Share of each domain's training samples held out as its reference slice (at least one
    sample, chosen by a hash of domain name and sample index: ``trainer.data.reference``), for
    controllers that steer on held-out data: DoGE's ``heldout`` mix, TiKMiX's ``heldout:<domain>``
    tasks. Never drawn by the sampler and disjoint from validation, which evaluation alone reads.
    Only runs whose controller asks for a held-out reference carve it out."""

    def validate(self):
        if self.source not in ("demo", "path", "prefixes"):
            raise ConfigError(f"data.source={self.source!r}; allowed: demo, path, prefixes")
        if self.source == "path" and not self.path:
            raise ConfigError("data.path must be set when data.source=path")
        if self.source == "prefixes" and not self.prefixes:
            raise ConfigError("data.prefixes must name at least one domain when data.source=prefixes")
        if self.eod_token is not None and self.tokenizer in TOKENIZERS:
            raise ConfigError(
                f"data.eod_token={self.eod_token!r} applies to a Hugging Face data.tokenizer; "
                f"data.tokenizer={self.tokenizer} has its own EOD"
            )
        for knob in ("seq_len", "steps_per_shard", "eval_sequences"):
            if getattr(self, knob) <= 0:
                raise ConfigError(f"data.{knob}={getattr(self, knob)} must be positive")
        if self.exhaustion not in POLICIES:
            raise ConfigError(f"data.exhaustion={self.exhaustion!r}; allowed: {', '.join(POLICIES)}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if self.subset not in SUBSETS:
            raise ConfigError(f"data.subset={self.subset!r}; allowed: {', '.join(SUBSETS)}")
        if not 0.0 < self.reference_fraction < 0.5:
            raise ConfigError(f"data.reference_fraction={self.reference_fraction} must be in (0, 0.5)")
        if self.subset != "all" and self.holdout_fraction <= 0:
            raise ConfigError(
                f"data.subset={self.subset} needs a holdout: set data.holdout_fraction > 0 (the curriculum uses 0.1)"
            )


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    micro_batch: int = 8
    """Sequences per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (derived when train.global_batch is set)."""
    global_batch: int = 0
    """Sequences per optimizer step over all data-parallel ranks; 0 = train.micro_batch x
    train.grad_accum x ranks. When set, train.grad_accum is derived (global_batch / (micro_batch x
    data-parallel ranks), a whole number), so the step means the same on any number of ranks and a
    checkpoint resumes on another rank count (an elastic restart; engine=torch and engine=fsdp
    reshard, deepspeed and megatron refuse, saying why)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; not norms, biases, embeddings' position table)."""
    betas: tuple = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    seed: int = 1234
    """Seeds model init and the data order."""
    eval_every: int = 50
    """Steps between validation passes (0 = only at the end)."""
    log_every: int = 1
    """Steps between metric lines."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (older ones are deleted)."""
    resume: str = "auto"
    """'auto' (the newest readable checkpoint of this run dir, if any; damaged ones are passed over
    with a warning), 'never' (start from step 0; refused in a run dir that holds checkpoints),
    'replace' (start from step 0, moving an earlier run's checkpoints and logs into
    ``<run.dir>/replaced-<time>/``), or a checkpoint path."""
    init_from: str | None = None
    """Warm start: a run directory (its newest complete checkpoint) or a checkpoint directory whose
    MODEL WEIGHTS this run starts from, with a fresh optimizer, mixture, data order and schedule
    (continue a main run on a new mixture, cool down on a target mix). The model knobs and the
    tokenizer must match it. Used only when the run starts; a resumed run continues its own state.
    engine=torch and engine=fsdp."""
    extend: bool = False
    """On resume, accept a train.steps other than the checkpoint's: the run continues (or, if it
    had finished, goes on) to the new train.steps, and the learning-rate schedule from the resumed
    step on is the new one (warm-up and cosine over the new total). Recorded in the run's lineage."""
    on_nonfinite: str = "abort"
    """A step whose training loss or gradient norm is not finite: 'abort' stops the run (exit 1,
    naming the step and domains; the last checkpoint stays the last good one, nothing non-finite is
    written), 'skip' drops that step's update and goes on, aborting after train.max_nonfinite such
    steps in a row. engine=deepspeed learns the norm only after its step, so there a non-finite
    norm always aborts."""
    max_nonfinite: int = 5
    """train.on_nonfinite=skip: consecutive non-finite steps tolerated before the run aborts."""
    fail_at_step: int = 0
    """Fault injection for restart tests: hard-exit right after this step (0 = off). Fires only in a
    job's first attempt (torchrun's TORCHELASTIC_RESTART_COUNT unset or 0), so a group restarted by
    ``--max-restarts`` runs through."""
    fail_rank: int = -1
    """Which rank train.fail_at_step kills: -1 = every rank (each exits with code 17), else only that
    rank, by SIGKILL (no cleanup); torchrun then tears the other ranks down and restarts the group."""
    fail_in_checkpoint: bool = False
    """Kill while writing step train.fail_at_step's checkpoint (the rank's files are in ``*.tmp``, the
    rename that completes it has not happened) instead of after the step."""

    def validate(self):
        for knob in ("steps", "micro_batch", "grad_accum"):
            if getattr(self, knob) <= 0:
                raise ConfigError(f"train.{knob}={getattr(self, knob)} must be positive")
        if self.global_batch < 0:
            raise ConfigError(
                f"train.global_batch={self.global_batch} must be >= 0 (0 = micro_batch x grad_accum x ranks)"
            )
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must be in [0, train.lr]")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas} must be two numbers in [0, 1)")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip} must be >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"train.seed={self.seed} must be in [0, 2**32)")
        for knob in ("eval_every", "checkpoint_every", "fail_at_step"):
            if getattr(self, knob) < 0:
                raise ConfigError(f"train.{knob} must be >= 0")
        if self.log_every <= 0 or self.keep_checkpoints <= 0:
            raise ConfigError("train.log_every and train.keep_checkpoints must be positive")
        if self.on_nonfinite not in ("abort", "skip"):
            raise ConfigError(f"train.on_nonfinite={self.on_nonfinite!r}; allowed: abort, skip")
        if self.max_nonfinite <= 0:
            raise ConfigError(f"train.max_nonfinite={self.max_nonfinite} must be positive")
        if self.fail_rank < -1:
            raise ConfigError(f"train.fail_rank={self.fail_rank} must be -1 (every rank) or a rank >= 0")
        # a fault that can never fire would let a restart test pass without testing anything
        if self.fail_in_checkpoint and not (
            self.fail_at_step == self.steps
            or (
                self.checkpoint_every
                and 0 < self.fail_at_step < self.steps
                and self.fail_at_step % self.checkpoint_every == 0
            )
        ):
            raise ConfigError(
                f"train.fail_in_checkpoint=true needs train.fail_at_step (now {self.fail_at_step}) at a step that "
                "writes a checkpoint: a multiple of train.checkpoint_every, or train.steps"
            )


# ds_config entries that engine=deepspeed sets from other knobs: refused in engine.deepspeed.ds_config, naming the knob.
DS_OWNED_KEYS = {
    "train_batch_size": "train.micro_batch x train.grad_accum x ranks",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr/betas/weight_decay (the engine passes the torch engine's AdamW)",
    "scheduler": "train.lr/min_lr/warmup_steps (the loop sets the learning rate every step)",
    "bf16": "engine.precision",
    "fp16": "engine.precision",
    "amp": "engine.precision",
}
DS_OWNED_ZERO_KEYS = {
    "stage": "engine.deepspeed.zero_stage",
    "offload_optimizer": "engine.deepspeed.offload_optimizer",
    "offload_param": "engine.deepspeed.offload_param",
}


def check_ds_config(extra) -> None:
    """Refuse ``engine.deepspeed.ds_config`` entries that another knob owns (the message names that knob)."""
    if not isinstance(extra, dict):
        raise ConfigError(f"engine.deepspeed.ds_config must be a mapping of ds_config entries, got {extra!r}")
    for key, owner in DS_OWNED_KEYS.items():
        if key in extra:
            raise ConfigError(f"engine.deepspeed.ds_config.{key} is set from {owner}; set that knob instead")
    zero = extra.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"engine.deepspeed.ds_config.zero_optimization must be a mapping, got {zero!r}")
    for key, owner in DS_OWNED_ZERO_KEYS.items():
        if key in zero:
            raise ConfigError(
                f"engine.deepspeed.ds_config.zero_optimization.{key} is set from {owner}; set that knob instead"
            )


@dataclass
class DeepSpeedConfig:
    """engine=deepspeed's own knobs (``engine.deepspeed.*``)."""

    zero_stage: int = 0
    """ZeRO stage. 0 = plain data parallel; 1 = optimizer states partitioned over ranks;
    2 = also gradients; 3 = also parameters (see zero3_whole_params)."""
    offload_optimizer: str = "none"
    """zero_stage >= 1: where optimizer states and the update live: none, cpu or nvme
    (ZeRO-Offload). Uses DeepSpeed's CPU Adam (same groups and hyperparameters), which DeepSpeed
    JIT-compiles on first use (needs a C++ compiler)."""
    offload_param: str = "none"
    """zero_stage = 3: where partitioned parameters live between uses: none, cpu or nvme."""
    offload_nvme_path: str | None = None
    """folder for nvme offload (required when an offload knob is nvme)."""
    zero3_whole_params: bool = False
    """zero_stage = 3: keep every parameter whole on every rank (gradients and optimizer
    states stay partitioned, so parameter memory is that of ZeRO-2). The gradient probe works either
    way: with false (DeepSpeed's ZeRO-3, parameters partitioned between uses) it reads the parameters'
    full shapes from DeepSpeed (ds_shape), so controllers that ask for gradient signals (dga, doge,
    tikmix, ...) run too, except with engine.deepspeed.offload_param=nvme (untested, refused); loss-only
    controllers (uniform, static, temperature, doremi, odm, ...) run either way."""
    ds_config: dict = field(default_factory=dict)
    """extra ds_config entries merged last (recursively), e.g.
    {zero_optimization: {reduce_bucket_size: 5e7, overlap_comm: true}}. Keys another knob sets
    (batch sizes, gradient_accumulation_steps, gradient_clipping, optimizer, scheduler, bf16/fp16/amp,
    zero_optimization.stage/offload_*) are refused: set that knob."""

    def validate(self):
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"engine.deepspeed.zero_stage={self.zero_stage!r}; allowed: 0, 1, 2, 3")
        for knob in ("offload_optimizer", "offload_param"):
            if getattr(self, knob) not in ("none", "cpu", "nvme"):
                raise ConfigError(f"engine.deepspeed.{knob}={getattr(self, knob)!r}; allowed: none, cpu, nvme")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ConfigError(
                f"engine.deepspeed.offload_optimizer={self.offload_optimizer} needs engine.deepspeed.zero_stage "
                "1, 2 or 3 (got 0)"
            )
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ConfigError(
                f"engine.deepspeed.offload_param={self.offload_param} needs engine.deepspeed.zero_stage=3 "
                f"(got {self.zero_stage})"
            )
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.offload_nvme_path:
            raise ConfigError("engine.deepspeed.offload_nvme_path must name a folder when an offload knob is nvme")
        if not isinstance(self.zero3_whole_params, bool):
            raise ConfigError(f"engine.deepspeed.zero3_whole_params={self.zero3_whole_params!r}; allowed: true, false")
        if self.zero3_whole_params and self.zero_stage != 3:
            raise ConfigError(
                f"engine.deepspeed.zero3_whole_params=true needs engine.deepspeed.zero_stage=3 (got {self.zero_stage})"
            )
        if self.ds_config is None:
            self.ds_config = {}
        check_ds_config(self.ds_config)
        zero = self.ds_config.get("zero_optimization", {})
        if "stage3_param_persistence_threshold" in zero and self.zero3_whole_params:
            raise ConfigError(
                "engine.deepspeed.ds_config.zero_optimization.stage3_param_persistence_threshold conflicts with "
                "engine.deepspeed.zero3_whole_params=true (which keeps every parameter whole)"
            )


@dataclass
class MegatronConfig:
    """engine=megatron's own knobs (``engine.megatron.*``)."""

    tensor_parallel: int = 1
    """tensor-parallel size TP (Megatron's column/row-parallel split of every linear layer
    and of the vocabulary). Must be >= 1, divide the number of ranks (data-parallel size = ranks / TP)
    and divide model.n_head and model.n_kv_head. A checkpoint resumes only with the same TP."""
    vocab_multiple: int = 128
    """the vocabulary (model.vocab_size) is padded up to a multiple of this, independently
    of TP so runs with different TP train the same padded model; must be divisible by
    engine.megatron.tensor_parallel. Padded logits take part in the softmax, as in Megatron-LM."""

    def validate(self):
        tp, multiple = self.tensor_parallel, self.vocab_multiple
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(
                f"engine.megatron.tensor_parallel={tp!r}; allowed: an integer >= 1 that divides the number of "
                "ranks and model.n_head"
            )
        # that it divides the ranks is checked where they are known: dist.data_parallel
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1 or multiple % tp:
            raise ConfigError(
                f"engine.megatron.vocab_multiple={multiple!r} must be a positive multiple of "
                f"engine.megatron.tensor_parallel={tp}"
            )


@dataclass
class FSDPConfig:
    """engine=fsdp's own knobs (``engine.fsdp.*``)."""

    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for the
    backward (ZeRO-3 memory); false keeps them until the backward (ZeRO-2 memory, one all-gather
    fewer per block)."""

    def validate(self):
        if not isinstance(self.reshard_after_forward, bool):
            raise ConfigError(f"engine.fsdp.reshard_after_forward={self.reshard_after_forward!r}; allowed: true, false")


PRECISIONS = {
    "torch": ("fp32", "bf16"),
    "fsdp": ("fp32", "bf16"),
    "megatron": ("fp32", "bf16"),
    "deepspeed": ("fp32", "bf16", "fp16"),
}
"""engine.precision's allowed values per engine."""
KNOB_ENGINES = {"compile": ("torch",), "activation_checkpointing": ("torch", "fsdp")}
"""The engines that take engine.compile and engine.activation_checkpointing."""


@dataclass
class EngineConfig:
    name: str = "torch"
    """Registered engine: 'torch' (DDP), 'fsdp' (FSDP2 fully_shard per block; its knobs under engine.fsdp),
    'deepspeed' (ZeRO 0-3; its knobs under engine.deepspeed) or 'megatron' (megatron-core GPTModel,
    tensor + data parallel; its knobs under engine.megatron)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl with CUDA, else gloo), gloo or nccl."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when available, else cpu), cpu or cuda."""
    threads: int = 0
    """torch intra-op threads per rank (0 = leave torch's default)."""
    precision: str = "fp32"
    """fp32, or bf16: compute in bfloat16 with fp32 master weights, gradients and optimizer state
    (torch, fsdp: autocast; megatron: bf16 parameters with fp32 main gradients; deepspeed: its bf16
    mode), or fp16 (deepspeed only, dynamic loss scaling, GPU only). The probe accumulates in fp32.
    megatron and deepspeed checkpoints resume only at the same precision. CPUs without bf16 GEMMs
    run bf16 slower than fp32."""
    compile: bool = False
    """torch: torch.compile each block (inductor). With the probe recording, the probe-aware
    layers run eagerly between compiled regions (a graph break per layer on probed micro-batches
    only; bench_engines measures the cost)."""
    activation_checkpointing: bool = False
    """torch, fsdp: recompute each block's activations in the backward instead of keeping them
    (non-reentrant torch.utils.checkpoint; the probe records the recomputed forward too)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU (0 = the datasheet figure of a known GPU at
    engine.precision, or on CPU a large GEMM measured at start)."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP2's knobs (engine=fsdp only)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed's knobs (engine=deepspeed only)."""
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    """Megatron-core's knobs (engine=megatron only)."""

    @property
    def tensor_parallel(self) -> int:
        """Ranks per model replica: engine.megatron.tensor_parallel on engine=megatron, else 1."""
        return int(self.megatron.tensor_parallel) if self.name == "megatron" else 1

    def validate(self):
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"engine.backend={self.backend!r}; allowed: auto, gloo, nccl")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"engine.device={self.device!r}; allowed: auto, cpu, cuda")
        if self.threads < 0:
            raise ConfigError(f"engine.threads={self.threads} must be >= 0")
        allowed = PRECISIONS.get(self.name, ("fp32",))
        if self.precision not in allowed:
            raise ConfigError(
                f"engine.precision={self.precision!r} on engine.name={self.name}; allowed: {', '.join(allowed)}"
            )
        for knob in ("compile", "activation_checkpointing"):
            value = getattr(self, knob)
            if not isinstance(value, bool):
                raise ConfigError(f"engine.{knob}={value!r}; allowed: true, false")
            if value and self.name not in KNOB_ENGINES[knob]:
                raise ConfigError(
                    f"engine.{knob}=true applies to engine.name {' or '.join(KNOB_ENGINES[knob])} (engine.name="
                    f"{self.name!r})"
                )
        if not self.peak_tflops >= 0:
            raise ConfigError(f"engine.peak_tflops={self.peak_tflops} must be >= 0 (0 = detect)")
        for sub, cls in (("fsdp", FSDPConfig), ("deepspeed", DeepSpeedConfig), ("megatron", MegatronConfig)):
            if self.name != sub and getattr(self, sub) != cls():
                changed = [
                    f.name
                    for f in dataclasses.fields(cls)
                    if getattr(getattr(self, sub), f.name) != getattr(cls(), f.name)
                ]
                raise ConfigError(
                    f"engine.{sub}.{changed[0]} applies to engine.name={sub} only (engine.name={self.name!r})"
                )
        if self.name in ("fsdp", "deepspeed", "megatron"):
            getattr(self, self.name).validate()

    def check_model(self, model: ModelConfig) -> None:
        """Knobs that constrain the model (called by Config.validate)."""
        if self.name == "megatron" and model.n_head % self.tensor_parallel:
            raise ConfigError(
                f"engine.megatron.tensor_parallel={self.tensor_parallel} does not divide "
                f"model.n_head={model.n_head}; "
                f"allowed: {[d for d in range(1, model.n_head + 1) if model.n_head % d == 0]}"
            )
        if self.name == "megatron" and model.kv_heads % self.tensor_parallel:
            raise ConfigError(
                f"engine.megatron.tensor_parallel={self.tensor_parallel} does not divide "
                f"model.n_kv_head={model.kv_heads} (each TP rank holds whole key/value heads)"
            )


GRAD_VAR_MODES = ("auto", "pieces", "sequence")


@dataclass
class ProbeConfig:
    exact_budget_mb: int = 512
    """Memory allowed for exact per-domain gradient accumulators (K x parameters x 4 bytes) when
    norms or the Gram are needed across micro-batches or ranks; above it the probe sketches."""
    sketch_dim: int = 0
    """0 = exact norms/Gram; > 0 = always use a shared-seed sketch of this dimension (unbiased,
    relative error about sqrt(2/m))."""

    grad_var: str = "auto"
    """How the per-domain gradient variance σ_k² is estimated when a controller asks for it (PiKE):
    "pieces" (every micro-batch on every rank is one piece of each domain's gradient: no extra
    work, m ≤ train.grad_accum x ranks pieces, NaN for a domain in fewer than 2), "sequence" (every
    sequence is a piece: n_k - 1 degrees of freedom; the layers materialise one weight-gradient
    piece per sequence instead of per domain, the same FLOPs in smaller GEMMs) or "auto" (pieces
    when a step has at least 8 micro-batches over all ranks, else per sequence)."""

    def validate(self):
        if self.exact_budget_mb < 0 or self.sketch_dim < 0:
            raise ConfigError("probe.exact_budget_mb and probe.sketch_dim must be >= 0")
        if self.grad_var not in GRAD_VAR_MODES:
            raise ConfigError(f"probe.grad_var={self.grad_var!r}; allowed: {', '.join(GRAD_VAR_MODES)}")


@dataclass
class RunConfig:
    name: str = "run"
    """Run name (the run directory's default last component)."""
    dir: str | None = None
    """Run directory; set by Hydra to its output dir (runs/<name>), rank 0's choice wins under torchrun."""
    wandb: str | None = None
    """wandb mode: offline (sync later with `wandb sync`), online or disabled; null = the
    environment's WANDB_MODE, else offline."""
    wandb_project: str | None = None
    """wandb project; null = the environment's WANDB_PROJECT, else 'mixtrain'."""
    wandb_entity: str | None = None
    """wandb entity (team or user); null = the environment's WANDB_ENTITY, else wandb's default."""
    wandb_group: str | None = None
    """wandb group (e.g. one per sweep or study); null = the environment's WANDB_RUN_GROUP, else none."""
    wandb_tags: list | None = None
    """wandb tags; null = the environment's WANDB_TAGS (comma-separated), else none."""
    plots: bool = True
    """Write PNG plots at the end of the run."""
    progress: bool = True
    """Show a progress bar on rank 0."""

    def validate(self):
        if self.wandb_mode not in WANDB_MODES:
            where = "run.wandb" if self.wandb is not None else "the environment's WANDB_MODE"
            raise ConfigError(f"{where}={self.wandb_mode!r}; allowed: {', '.join(WANDB_MODES)}")
        if self.wandb_tags is not None and not all(isinstance(t, str) and t for t in self.wandb_tags):
            raise ConfigError(f"run.wandb_tags={self.wandb_tags!r} must be a list of non-empty strings")
        # the name becomes runs/<name>-<time>: one folder name, never a path out of runs/
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=,-]*", self.name) or ".." in self.name:
            raise ConfigError(
                f"run.name={self.name!r} must be one folder name: letters, digits and ._+=,- "
                "(not starting with one of those, no '..'); put a path in run.dir instead"
            )

    @property
    def wandb_mode(self) -> str:
        if self.wandb is not None:
            return self.wandb
        mode = os.environ.get("WANDB_MODE") or "offline"
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's older names


WANDB_MODES = ("offline", "online", "disabled")

CURRICULA = ("none", "irreducible", "irreducible_online")


@dataclass
class CurriculumConfig:
    """Within-domain sample order (controllers reference §4, Fan & Jaggi 2023, arXiv 2310.15389).

    A curriculum only orders samples *inside* each domain; the mixture controller (any of them)
    still decides how many samples each domain supplies per shard. Both modes need a holdout the
    main run never draws: ``data.holdout_fraction`` (0.1) with ``data.subset=main``, which the
    ``curriculum=irreducible*`` groups set."""

    name: str = "none"
    """'none' (the plain per-epoch shuffle), 'irreducible' (static learnability scores from a proxy
    run: `mixtrain score PROXY_RUN`) or 'irreducible_online' (a proxy trained alongside on the
    holdout scores candidate pools at every shard boundary)."""
    scores: str | None = None
    """irreducible: a scores directory written by `mixtrain score` (PROXY_RUN/scores/<key>) or the
    proxy run directory itself (its one scores directory matching this run's data is used).
    Refused when its key does not match this run's shards, tokenizer or data.seq_len."""
    f0: float = 0.25
    """irreducible: eligible share of a domain's unconsumed samples at the start of training
    (f(0) = f0; the top 25% by learnability)."""
    u_full: float = 0.5
    """irreducible: training fraction at which every unconsumed sample becomes eligible;
    f(u) = f0 + (1 - f0)·min(1, u/u_full)."""
    order: str = "learnable_first"
    """irreducible: 'learnable_first' (the method) or 'anti' (the paper's anti-curriculum
    baseline: least learnable first, same pacing)."""
    pool_factor: int = 4
    """irreducible_online: candidates scored per sample drawn (a pool of 4x the shard's count for
    the domain, the top-scoring ones are taken)."""
    proxy_model: dict = field(default_factory=dict)
    """irreducible_online: the proxy's model knobs (model.* names) over the ModelConfig defaults
    (2 layers, d_model 64); vocab_size and max_seq_len follow the main model. Paper scale: a 6-layer
    GPT (n_layer 6, d_model 768, about 82M parameters with the GPT-2 vocabulary)."""
    proxy_lr: float = 1e-3
    """irreducible_online: the proxy's peak learning rate (same warm-up and cosine shape as the
    main run, min_lr = proxy_lr / 10)."""
    proxy_micro_batch: int | None = None
    """irreducible_online: holdout sequences per rank per proxy step (one proxy step per main
    step); null = train.micro_batch."""
    score_batch: int = 64
    """irreducible_online: sequences per forward when scoring a candidate pool."""

    def validate(self):
        if self.name not in CURRICULA:
            raise ConfigError(f"curriculum.name={self.name!r}; allowed: {', '.join(CURRICULA)}")
        if self.name == "irreducible" and not self.scores:
            raise ConfigError(
                "curriculum.scores must name a scores directory or a proxy run (curriculum=irreducible); "
                "train one with `mixtrain train +experiment=curriculum_proxy`, then `mixtrain score RUN`"
            )
        if not 0.0 < self.f0 <= 1.0:
            raise ConfigError(f"curriculum.f0={self.f0} must be in (0, 1]")
        if not 0.0 < self.u_full <= 1.0:
            raise ConfigError(f"curriculum.u_full={self.u_full} must be in (0, 1]")
        if self.order not in ORDERS:
            raise ConfigError(f"curriculum.order={self.order!r}; allowed: {', '.join(ORDERS)}")
        if int(self.pool_factor) != self.pool_factor or self.pool_factor < 1:
            raise ConfigError(f"curriculum.pool_factor={self.pool_factor} must be an integer >= 1")
        if not self.proxy_lr > 0:
            raise ConfigError(f"curriculum.proxy_lr={self.proxy_lr} must be > 0")
        if self.proxy_micro_batch is not None and self.proxy_micro_batch <= 0:
            raise ConfigError(f"curriculum.proxy_micro_batch={self.proxy_micro_batch} must be positive or null")
        if self.score_batch <= 0:
            raise ConfigError(f"curriculum.score_batch={self.score_batch} must be positive")
        if not isinstance(self.proxy_model, dict):
            raise ConfigError(f"curriculum.proxy_model must be a mapping of model knobs, got {self.proxy_model!r}")
        if self.proxy_model.get("vocab_size") is not None:
            raise ConfigError("curriculum.proxy_model.vocab_size is taken from the main model; leave it unset")
        _build(ModelConfig, dict(self.proxy_model), "curriculum.proxy_model")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    mixture: dict = field(default_factory=lambda: {"name": "uniform"})
    """Controller name and its knobs; validated by the controller's own Config dataclass."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Within-domain sample order (curriculum=none|irreducible|irreducible_online)."""

    def validate(self):
        """Knobs that constrain each other across groups."""
        if self.train.init_from and self.engine.name not in ("torch", "fsdp"):
            raise ConfigError(
                f"train.init_from applies to engine.name torch or fsdp (engine.name={self.engine.name!r}): the "
                "weights are loaded into the unsharded model names those engines keep"
            )
        self.engine.check_model(self.model)
        if self.curriculum.name != "none" and self.data.subset != "main":
            raise ConfigError(
                f"data.subset={self.data.subset!r} with curriculum={self.curriculum.name}: the main run must "
                "exclude the proxy's holdout (data.subset=main, data.holdout_fraction=0.1; the curriculum group sets "
                "both)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict:
        """Knobs a checkpoint must agree with to be resumed (what shapes the model, data order and
        the meaning of a step). Logging, evaluation cadence and fault injection are free to change."""
        d = self.to_dict()
        t = d["train"]
        out = {
            "model": d["model"],
            "data": {
                k: d["data"][k]
                for k in (
                    "source",
                    "path",
                    "prefixes",
                    "domains",
                    "seq_len",
                    "steps_per_shard",
                    "exhaustion",
                    "tokenizer",
                )
            },
            "train": {
                k: t[k]
                for k in (
                    "steps",
                    "micro_batch",
                    "grad_accum",
                    "lr",
                    "min_lr",
                    "warmup_steps",
                    "weight_decay",
                    "betas",
                    "grad_clip",
                    "seed",
                )
            },
            "mixture": d["mixture"],
        }
        # Added only when used, so checkpoints written before these knobs existed still resume.
        if self.data.subset != "all" or self.data.holdout_fraction:
            out["data"].update(holdout_fraction=self.data.holdout_fraction, subset=self.data.subset)
        if self.curriculum.name != "none":
            out["curriculum"] = d["curriculum"]
        return out


def _build(cls, values: Any, prefix: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {values!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown knob(s) {', '.join(f'{prefix}.{u}' for u in unknown)}; allowed: {', '.join(sorted(names))}"
        )
    nested = typing.get_type_hints(cls)
    kwargs = {
        k: _build(nested[k], v, f"{prefix}.{k}")
        if dataclasses.is_dataclass(nested[k])
        else typed(f"{prefix}.{k}", names[k].type, v)
        for k, v in values.items()
    }
    obj = cls(**kwargs)
    obj.validate()
    return obj


_KINDS = {
    "int": "an integer",
    "float": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "dict": "a mapping",
    "list": "a list",
    "tuple": "a list",
    "None": "null",
}


def typed(knob: str, annotation: str, value: Any) -> Any:
    """``value`` as the field's annotated type (``int``, ``float | None``, …), or a ConfigError
    naming the knob and what it accepts. An integral float is an int (YAML's 1e6) and a number
    written as a string is a float (YAML 1.1 reads 1e-3 as a string); nothing else is converted:
    7.5 steps, a boolean for a number, NaN or infinity are refused."""
    kinds = [k.strip() for k in annotation.split("|")]
    for kind in kinds:
        if kind == "None" and value is None:
            return None
        if kind == "bool" and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if kind == "int":
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind == "float":
            number = value
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    continue
            if isinstance(number, (int, float)) and math.isfinite(number):
                return float(number)
        elif kind == "str" and isinstance(value, str):
            return value
        elif kind == "dict" and isinstance(value, dict):
            return value
        elif kind in ("list", "tuple") and isinstance(value, (list, tuple)):
            return tuple(value) if kind == "tuple" else list(value)
    allowed = " or ".join(_KINDS.get(k, k) for k in kinds)
    raise ConfigError(f"{knob}={value!r} must be {allowed}")


def load_config(values: dict) -> Config:
    """Validate a plain dict (Hydra's composed config, resolved) into a Config."""
    values = dict(values)
    allowed = {"model", "data", "train", "engine", "run", "probe", "mixture", "curriculum"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown config group(s) {unknown}; allowed: {sorted(allowed)}")
    mixture = values.get("mixture") or {"name": "uniform"}
    if not isinstance(mixture, dict) or "name" not in mixture:
        raise ConfigError("mixture must be a mapping with a 'name' (e.g. mixture=static)")
    cfg = Config(
        model=_build(ModelConfig, values.get("model"), "model"),
        data=_build(DataConfig, values.get("data"), "data"),
        train=_build(TrainConfig, values.get("train"), "train"),
        engine=_build(EngineConfig, values.get("engine"), "engine"),
        run=_build(RunConfig, values.get("run"), "run"),
        probe=_build(ProbeConfig, values.get("probe"), "probe"),
        mixture=dict(mixture),
        curriculum=_build(CurriculumConfig, values.get("curriculum"), "curriculum"),
    )
    cfg.validate()
    return cfg


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
