"""Megatron-core engine (``engine=megatron``): GPTModel with tensor and data parallelism.

- Process groups: the loop's group, then ``parallel_state.initialize_model_parallel(TP, PP=1)``;
  ranks are TP-fastest, so data-parallel rank = rank // TP and size = ranks / TP. Both TP ranks of a
  replica see the same micro-batches (the loop shards data with ``dp_rank``/``dp_size``).
- Model: ``trainer.models.megatron_gpt`` (``model.name`` gpt or llama; local layer spec, the
  Transformer Engine spec when CUDA and TE are present), vocabulary padded to
  ``engine.megatron.vocab_multiple``. On CPU the CUDA shim (``megatron_shim``) is applied and
  ``use_cpu_initialization`` draws full matrices before slicing, so every TP size starts from the
  same weights for the same seed.
- Gradients: megatron's DistributedDataParallel (fp32 grad buffer, no overlap, no distributed
  optimizer) reduces over the data-parallel group into ``param.main_grad``; ``finish_grad_sync``
  runs once per step after the last micro-batch. megatron's optimizers hard-code CUDA buffers, so a
  torch AdamW (``torch_ddp.adamw``'s groups) steps on the local shards with ``.grad`` pointed at
  ``main_grad``.
- ``engine.precision=bf16``: megatron's mixed precision (``TransformerConfig(bf16=True)``, bf16
  parameters as megatron's Float16Module makes them, softmax in fp32) with the fp32 ``main_grad``
  above; the AdamW steps fp32 master copies of the bf16 parameters (fp32 moments too) and each
  step's result is rounded into them, as megatron's mixed-precision optimizer does.
  ``engine.optimizer`` (what ``trainer.signals`` reads) is then a view keyed by the bf16 parameters.
- Clipping: the global norm sums squared norms of sharded parameters over the TP group and counts
  replicated ones (layer norms, row-parallel biases, position table) once; after the DP reduction
  every DP replica holds the same gradient, so no DP sum is needed.
- Loss accounting: per-domain loss sums / token counts are returned by TP rank 0 of each replica
  only (zeros elsewhere), so the loop's all-reduce over every rank counts each token once; the same
  for ``sequence_loss_sums`` and the ``on_losses`` hook.
- Checkpoints (``save_checkpoint``/``load_checkpoint``, inside ``trainer.checkpoint``'s atomic
  directory): rank 0 writes the loop state as ``state.pt``; the first DP replica's ranks each write
  ``megatron/tp_rank_XX.pt`` (their model shard, the fp32 masters under bf16, and AdamW state), so
  a bf16 run resumes bit-exactly. ``meta.json`` records ``engine.megatron.tensor_parallel`` and
  ``engine.precision``; a different value of either is refused at resume. ``read_checkpoint``
  (no process group: an export) merges the shards into the full weights under megatron's names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoint, safe_load
from ..config import ConfigError, EngineConfig, ModelConfig, TrainConfig
from .base import Engine, register
from .torch_ddp import adamw

CHECKPOINT_SUBDIR = "megatron"
"""Where the per-TP-rank shard files go inside a mixtrain checkpoint directory."""


def _shard_file(directory: Path, tp_rank: int) -> Path:
    return Path(directory) / CHECKPOINT_SUBDIR / f"tp_rank_{tp_rank:02d}.pt"


def _transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class _MasterView:
    """``engine.optimizer`` under bf16 as ``trainer.signals`` reads it: the AdamW that steps the fp32
    masters, with ``param_groups`` over the MODEL's (bf16) parameters and ``state.get(p)`` by model
    parameter (its master's moments). Built on each access, so it never holds a stale group."""

    def __init__(self, adam: torch.optim.Optimizer, params: list, masters: list):
        model_of = {id(m): p for p, m in zip(params, masters)}
        self.param_groups = [{**g, "params": [model_of[id(m)] for m in g["params"]]} for g in adam.param_groups]
        self.state = {p: adam.state[m] for p, m in zip(params, masters) if m in adam.state}


@register("megatron")
class MegatronEngine(Engine):
    weight_names = "megatron"
    reshard_refusal = (
        "its per-TP-rank shard files would load on another data-parallel size, but that is untested; resume on "
        "the same number of ranks"
    )

    def __init__(self, engine_cfg: EngineConfig, model_cfg: ModelConfig, train_cfg: TrainConfig):
        self._join(engine_cfg)
        tp = int(engine_cfg.megatron.tensor_parallel)  # divides the ranks: dist.data_parallel checked it
        if not torch.distributed.is_initialized():
            # one process without torchrun: megatron's parallel_state needs a group all the same
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif torch.cuda.is_available():
            raise ConfigError(
                "engine=megatron with engine.device=cpu needs a machine without CUDA (megatron-core allocates "
                "on the CUDA device when one exists, and the CPU shim is never applied there); use engine.device=auto"
            )
        from .megatron_shim import apply_cpu_shim

        apply_cpu_shim()  # no-op when CUDA is present
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from ..models.megatron_gpt import ParallelLayout, build_megatron_gpt

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        self.layout = ParallelLayout(
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=tp,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_group=parallel_state.get_data_parallel_group(),
        )
        if (self.layout.dp_rank, self.layout.dp_size) != (self.rank // tp, self.world_size // tp):
            raise RuntimeError("megatron's rank order is not TP-fastest; the loop's data sharding assumes it")
        self.train_cfg, self.engine_cfg = train_cfg, engine_cfg
        self.bf16 = engine_cfg.precision == "bf16"

        torch.manual_seed(train_cfg.seed)  # same full-matrix draws on every rank and every TP size
        model_parallel_cuda_manual_seed(train_cfg.seed)  # megatron's dropout RNG tracker
        self.model = build_megatron_gpt(
            model_cfg,
            engine_cfg.megatron.vocab_multiple,
            self.layout,
            use_te=_transformer_engine_available(),
            cpu=self.device.type == "cpu",
            bf16=self.bf16,
        ).to(self.device)
        gpt = self.model.gpt
        self.ddp = DistributedDataParallel(
            gpt.config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
            ),
            gpt,
        )
        named = [(n, p) for n, p in gpt.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        # megatron's own mixed-precision optimizer hard-codes CUDA: under bf16 the AdamW steps fp32
        # master copies (fp32 state too), and each step's result is rounded into the bf16 parameters
        self._masters = [torch.nn.Parameter(p.detach().float()) for p in self._params] if self.bf16 else self._params
        self._adam = adamw(torch.nn.ParameterList(self._masters), train_cfg)

    @property
    def _accounts_losses(self) -> bool:
        return self.layout.tp_rank == 0

    # ---- the contract -------------------------------------------------------------------------
    # megatron's DDP averages over the DP group: with this replica's tokens per step as the
    # denominator (the base loop's), the gradient is the mean over all tokens of the step
    def _end_step(self) -> None:
        self.ddp.finish_grad_sync()  # all-reduce (mean) of main_grad over the data-parallel group

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradient (float64): shards summed over TP, replicas once."""
        sq = torch.zeros(1, dtype=torch.float64, device=self.device)
        for p in self._params:
            if p.main_grad is not None and self.layout.counted_here(p):
                sq += p.main_grad.double().pow(2).sum()
        return self.layout.tp_sum(sq).sqrt()

    @property
    def optimizer(self):
        """The optimizer as ``trainer.signals`` reads it (Adam's moments per model parameter): the
        AdamW itself under fp32, a view keyed by the bf16 parameters of the AdamW over their masters
        under bf16."""
        return _MasterView(self._adam, self._params, self._masters) if self.bf16 else self._adam

    def optimizer_step(self, lr: float) -> float:
        for group in self._adam.param_groups:
            group["lr"] = lr
        norm = self.grad_norm()
        if not torch.isfinite(norm):
            self.discard_gradients()
            return float(norm)
        clip = self.train_cfg.grad_clip
        # torch.nn.utils.clip_grad_norm_'s rule, on the global norm
        coef = torch.clamp(clip / (norm + 1e-6), max=1.0).float() if clip > 0 else None
        for p, master in zip(self._params, self._masters):
            master.grad = p.main_grad if coef is None else p.main_grad.mul_(coef)
        self._adam.step()
        if self.bf16:
            with torch.no_grad():
                for p, master in zip(self._params, self._masters):
                    p.copy_(master)
        self.discard_gradients()
        return float(norm)

    def discard_gradients(self) -> None:
        for p, master in zip(self._params, self._masters):
            # a .grad left on main_grad (fp32: p is its own master): autograd would accumulate into
            # it and DDP's hook add it again
            p.grad = master.grad = None
        self.ddp.zero_grad_buffer()

    def state_dict(self) -> dict:
        """This rank's shards: the model (megatron's keys, local slices; the fp32 master weights
        under bf16) and the AdamW state."""
        # megatron adds `_extra_state` entries (None without Transformer Engine): tensors only
        model = {k: v for k, v in self.model.gpt.state_dict().items() if torch.is_tensor(v)}
        model.update(zip(self._names, self._masters))
        return {"model": {k: v.detach().clone() for k, v in model.items()}, "optimizer": self._adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            missing, unexpected = self.model.gpt.load_state_dict(state["model"], strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise KeyError(f"megatron state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
            if self.bf16:  # the bf16 parameters were rounded from these; the masters keep every bit
                for name, master in zip(self._names, self._masters):
                    master.copy_(state["model"][name])
        if "optimizer" in state:
            self._adam.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def sequence_loss_sums(self, batch: torch.Tensor) -> torch.Tensor:
        """Collective over the TP group (every TP rank runs the forward); counted on TP rank 0."""
        sums = super().sequence_loss_sums(batch)
        return sums if self._accounts_losses else torch.zeros_like(sums)

    # ---- checkpoints ------------------------------------------------------------------------------
    @classmethod
    def checkpoint_format(cls, engine_cfg) -> dict:
        # the shards hold fp32 weights and AdamW state either way, but a bf16 run continued in fp32
        # (or the reverse) is no continuation of either: refused at resume like a changed TP
        return {
            "name": "megatron",
            "tensor_parallel": int(engine_cfg.megatron.tensor_parallel),
            "precision": engine_cfg.precision,
        }

    @classmethod
    def vet_checkpoint(cls, directory: Path, meta: dict) -> None:
        super().vet_checkpoint(directory, meta)  # state.pt: the loop's state
        cls._vet_folder(directory, CHECKPOINT_SUBDIR)

    @classmethod
    def read_checkpoint(cls, directory: Path, meta: dict) -> dict:
        """The loop's state with ``engine.model``: the full fp32 weights under megatron's names (a
        TP=1 GPTModel's state dict), merged from the TP ranks' shards (the fp32 masters under bf16)."""
        from ..models.megatron_gpt import merge_tensor_parallel

        state = super().read_checkpoint(directory, meta)
        tp = int((meta.get("engine") or {}).get("tensor_parallel", 1))
        shards = []
        for r in range(tp):
            path = _shard_file(directory, r)
            if not path.is_file():
                raise checkpoint.DamagedCheckpoint(f"{directory} holds no megatron shard for TP rank {r} ({path})")
            shards.append(safe_load.load(path)["model"])
        state["engine"] = {"model": merge_tensor_parallel(shards)}
        return state

    def save_checkpoint(self, directory: Path, client_state: dict | None) -> None:
        """Collective. Rank 0 writes the loop's state (``client_state``) as ``state.pt``; each rank of
        the first data-parallel replica writes its TP shard (DP replicas hold identical copies)."""
        if client_state is not None:
            torch.save(client_state, Path(directory) / checkpoint.STATE_FILE)
        if self.layout.dp_rank == 0:
            path = _shard_file(directory, self.layout.tp_rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"tensor_parallel": self.layout.tp_size, "tp_rank": self.layout.tp_rank, **self.state_dict()}, path
            )

    def load_checkpoint(self, directory: Path) -> dict:
        """This rank's TP shard and the loop's state from ``directory``."""
        path = _shard_file(directory, self.layout.tp_rank)
        if not path.is_file():
            raise FileNotFoundError(f"{directory} holds no megatron shard for TP rank {self.layout.tp_rank} ({path})")
        shard = safe_load.load(path, map_location=self.device)
        if shard["tensor_parallel"] != self.layout.tp_size:
            raise checkpoint.CheckpointMismatch(
                f"checkpoint {directory} was written with engine.megatron.tensor_parallel={shard['tensor_parallel']}, "
                f"now engine.megatron.tensor_parallel={self.layout.tp_size}; resume with the same value"
            )
        self.load_state_dict(shard)
        return safe_load.load(Path(directory) / checkpoint.STATE_FILE)
