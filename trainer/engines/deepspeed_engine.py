"""DeepSpeed engine (``engine=deepspeed``): ZeRO stages 0-3 over the same model, loop and probe.

What it does on top of ``deepspeed.initialize``:

- the ds_config comes from Hydra (``build_ds_config``): micro-batch and accumulation from ``train.*``,
  ``gradient_clipping`` from ``train.grad_clip``, ZeRO stage, precision and offload from ``engine.*``,
  then ``engine.deepspeed.ds_config`` merged last for anything else (keys owned by another knob are refused);
- the optimizer is the torch engine's AdamW (``torch_ddp.adamw``: same groups and hyperparameters),
  passed as an instance, so DeepSpeed neither builds a scheduler nor JIT-compiles FusedAdam; the loop
  sets the learning rate before every step;
- on a CPU accelerator the process group is gloo and DeepSpeed's shared-memory inference op, which it
  would otherwise JIT-compile at start-up (~40 s), is skipped (engines.md §3.4);
- accumulation follows DeepSpeed's protocol (``step()`` after every micro-batch, the optimizer update
  at the boundary): ``forward_backward`` calls ``step()`` after every micro-batch but the last, and
  ``optimizer_step`` makes the boundary call, so the probe's statistics and the controller's
  measurements are taken between the last backward and the update, as with the torch engine;
- loss normalisation matches the torch engine: each micro-batch's objective is its weighted token-loss
  sum over this rank's tokens per step, passed with ``scale_wrt_gas=False`` (DeepSpeed would divide by
  the accumulation steps again) and averaged over ranks by DeepSpeed's reduction.

Checkpoints go through DeepSpeed's own ``save_checkpoint``/``load_checkpoint`` (``save_checkpoint``
and ``load_checkpoint`` below; ``trainer.checkpoint`` puts them inside its atomic directory).

The probe under ZeRO-3. The probe-aware layers save the weight for their backward and DeepSpeed
re-gathers it (module hooks) before the layer's backward runs, so the per-domain pieces a layer hands
the probe are full-shaped, and reference gradients taken with ``torch.autograd.grad`` through the
unwrapped module (whose forward gathers the parameters) come back full-shaped too. The probe sizes its
slots and accumulators from a parameter's full shape (DeepSpeed's ``ds_shape``; ``p.shape`` is
``(0,)`` while a parameter is partitioned), so gradient signals work with DeepSpeed's own ZeRO-3
(the default, parameters partitioned between uses, also offloaded to CPU) and with
``engine.deepspeed.zero3_whole_params=true``: every parameter is made "persistent" (DeepSpeed re-gathers
persistent parameters after each step) and exempt from the release DeepSpeed performs while it
records a new module trace (``_whole_params``). Gradients and optimizer states stay partitioned either
way. Only partitioned parameters offloaded to nvme (untested) refuse a controller that asks for
gradient signals, with a ConfigError naming the knobs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import logging
import os
import sys
from pathlib import Path

import torch

from .. import dist, safe_load
from ..config import ConfigError, EngineConfig, ModelConfig, TrainConfig, check_ds_config
from ..models import build_model, token_losses
from .base import Engine, MicroBatch, register
from .torch_ddp import adamw

CHECKPOINT_SUBDIR = "deepspeed"
"""Where DeepSpeed's files go inside a mixtrain checkpoint directory."""
CHECKPOINT_TAG = "model"
"""DeepSpeed's tag (its per-checkpoint folder) inside ``CHECKPOINT_SUBDIR``."""
CLIENT_KEY = "mixtrain"
"""The loop's state inside DeepSpeed's client_state (one key: no clash with DeepSpeed's own)."""

_ALL_WHOLE = 2**62
"""stage3_param_persistence_threshold that makes every parameter persistent
(engine.deepspeed.zero3_whole_params=true)."""


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` merged into a copy of ``base``, recursively for nested mappings."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _offload(device: str, nvme_path: str | None) -> dict:
    out = {"device": device}
    if device == "nvme":
        out["nvme_path"] = nvme_path
    return out


def build_ds_config(engine: EngineConfig, train: TrainConfig, world_size: int) -> dict:
    """The ds_config for these knobs (a pure function: no DeepSpeed import)."""
    ds = engine.deepspeed
    check_ds_config(ds.ds_config)
    zero: dict = {"stage": int(ds.zero_stage)}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.offload_nvme_path)
    if ds.offload_param != "none":
        zero["offload_param"] = _offload(ds.offload_param, ds.offload_nvme_path)
    if ds.zero_stage == 3 and ds.zero3_whole_params:
        zero["stage3_param_persistence_threshold"] = _ALL_WHOLE
    cfg = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW instance under ZeRO
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own progress lines are noise
        "wall_clock_breakdown": False,
    }
    if engine.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif engine.precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    return _merge(cfg, ds.ds_config)


def _skip_shm_op_build() -> None:
    """DeepSpeed's CPU communication backend JIT-compiles a shared-memory op (used only by inference
    all-reduce) on every start; replace the builder with a no-op. Private name: guarded."""
    try:
        importlib.import_module("deepspeed.comm.torch")
        module = sys.modules["deepspeed.comm.torch"]  # not `import ... as`: that name resolves to torch
        if callable(getattr(module, "build_shm_op", None)):
            module.build_shm_op = lambda: None
    except Exception:  # noqa: BLE001  a later DeepSpeed without it: pay the build or nothing
        pass


class _FullOptimizerView:
    """What ``trainer.signals`` reads from ``engine.optimizer`` (``param_groups`` with betas/eps over
    the MODEL's parameters, and ``state.get(p)`` with ``exp_avg``, ``exp_avg_sq`` and ``step``),
    assembled from ZeRO's partitioned optimizer states. Reading a state is a collective under
    ZeRO-1/2/3 (DeepSpeed all-reduces the fragments): every rank must read the same parameters in the
    same order, which signals does."""

    def __init__(self, ds_engine, groups: list[dict]):
        self._ds = ds_engine
        self.param_groups = groups  # hyperparameters per group; "params" are model parameters
        self._linked_at: float | None = None
        self.state = _FullStateView(self)

    def _step(self) -> float | None:
        """Adam's step count (the same for every flat partition), None before the first step."""
        for st in self._ds.optimizer.optimizer.state.values():  # the torch AdamW over flat partitions
            if "step" in st:
                return float(st["step"])
        return None

    def _link(self, step: float) -> None:
        """ZeRO-1/2 and bf16 link each parameter to its optimizer-state fragments once, right after
        the FIRST group's first step, when the other groups' Adam states do not exist yet (DeepSpeed
        0.19): their exp_avg/exp_avg_sq are then missing from the mapping. Re-link once per step."""
        opt = self._ds.optimizer
        if self._linked_at != step and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        self._linked_at = step


class _FullStateView:
    """``optimizer.state`` of ``_FullOptimizerView``: full-shaped states of a model parameter."""

    def __init__(self, view: _FullOptimizerView):
        self._view = view

    def get(self, p, default=None):
        step = self._view._step()
        if step is None:
            return {} if default is None else default
        from deepspeed.utils import safe_get_full_optimizer_state

        self._view._link(step)
        out = {"step": step}
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(p, key)
            if full is not None:
                out[key] = full.reshape(getattr(p, "ds_shape", p.shape))
        return out

    def __getitem__(self, p):
        return self.get(p)

    def __contains__(self, p) -> bool:
        return self._view._step() is not None


@register("deepspeed")
class DeepSpeedEngine(Engine):
    reshard_refusal = (
        "DeepSpeed writes one ZeRO partition file per rank and reloads them on as many ranks (its universal "
        "checkpoint conversion is not wired in); resume on the same number of ranks"
    )
    skips_nonfinite = False  # DeepSpeed reports the norm of the step it took (its fp32 path checks nothing)

    def __init__(self, engine_cfg: EngineConfig, model_cfg: ModelConfig, train_cfg: TrainConfig):
        if importlib.util.find_spec("deepspeed") is None:  # an optional extra: refused before step 0
            raise ConfigError("engine=deepspeed needs DeepSpeed: pip install 'mixtrain[deepspeed]'")
        self._join(engine_cfg)
        if self.device.type == "cpu" and engine_cfg.precision == "fp16":
            raise ConfigError(
                "engine.precision=fp16 is not supported by DeepSpeed on CPU; use fp32 (or bf16, 5-10x slower there)"
            )
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # also on a machine with a GPU: engine.device=cpu
        elif self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not torch.distributed.is_initialized():
            # One process without torchrun: a 1-rank group from an in-memory store (no port, no MPI
            # discovery, which DeepSpeed would otherwise attempt).
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
            for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(var, value)  # DeepSpeed's sanity check reads them
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        if self.device.type == "cpu":
            _skip_shm_op_build()
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)

        self.engine_cfg, self.train_cfg = engine_cfg, train_cfg
        self.zero_stage = int(engine_cfg.deepspeed.zero_stage)
        self.ds_config = build_ds_config(engine_cfg, train_cfg, self.world_size)
        torch.manual_seed(train_cfg.seed)  # same init as the torch engine (and on every rank)
        model = build_model(model_cfg)
        optimizer = self._optimizer(model)
        # the groups over model parameters, before ZeRO replaces them with flat partitions
        self._groups = [
            {k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
            for g in optimizer.param_groups
        ]
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.model = self.ds.module
        self._view: _FullOptimizerView | None = None
        self._partitioned = self.zero_stage == 3 and not engine_cfg.deepspeed.zero3_whole_params
        self._training_forward = False
        if self._partitioned and engine_cfg.deepspeed.offload_param == "nvme":
            self.model.register_forward_pre_hook(self._refuse_gradient_forward)
        self._whole_params()
        if self.rank == 0 and self.zero_stage == 3:
            print(
                f"[mixtrain] ZeRO-3 with {'whole' if not self._partitioned else 'partitioned'} parameters "
                f"(engine.deepspeed.zero3_whole_params={str(not self._partitioned).lower()})",
                flush=True,
            )

    def _whole_params(self) -> None:
        """ZeRO-3 with engine.deepspeed.zero3_whole_params=true: make every parameter whole now and keep it so.
        All parameters are persistent (build_ds_config), but DeepSpeed gathers persistent parameters
        only at their first use and after a step or a checkpoint, and releases them anyway while it
        records a module trace (the first forward, and again whenever the call order changes: an
        evaluation, a reference gradient). Marking them external parameters exempts them from those
        releases; a step still partitions everything and then re-gathers the persistent ones.
        Collective (all ranks build and load together). Relies on DeepSpeed 0.19 internals
        (``persistent_parameters``, ``is_external_param``): checked, with an error if they change."""
        if self.zero_stage != 3 or self._partitioned:
            return
        params = list(self.model.parameters())
        for p in params:
            p.is_external_param = True
        persistent = list(getattr(self.ds.optimizer, "persistent_parameters", None) or [])
        if persistent:
            persistent[0].all_gather(persistent)
        partial = [n for n, p in self.model.named_parameters() if p.numel() != getattr(p, "ds_numel", p.numel())]
        if partial or len(persistent) != len(params):
            raise RuntimeError(
                "engine.deepspeed.zero3_whole_params=true could not keep every parameter whole with this DeepSpeed "
                f"version (partitioned: {partial[:5]}); set it to false (DeepSpeed's partitioned parameters)"
            )

    def _refuse_gradient_forward(self, module, args) -> None:
        """Partitioned ZeRO-3 parameters offloaded to nvme: a gradient-enabled forward of the unwrapped
        model outside the training step is a controller's reference or probe-batch gradient, which is
        not supported there: refuse it with the knobs to turn. (The probe is built before that forward
        and records nothing wrong until then; evaluation runs under no_grad.)"""
        if torch.is_grad_enabled() and not self._training_forward:
            self._check_probe(True)

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The torch engine's AdamW; with optimizer offload, DeepSpeed's CPU Adam over the same groups
        (DeepSpeed requires it for offloading and JIT-builds its cpu_adam op on first use)."""
        opt = adamw(model, self.train_cfg)
        forced = self.ds_config.get("zero_force_ds_cpu_optimizer", True)
        if self.engine_cfg.deepspeed.offload_optimizer != "none" and forced:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(
                opt.param_groups, lr=self.train_cfg.lr, betas=tuple(self.train_cfg.betas), adamw_mode=True
            )
        return opt

    # ---- the contract -------------------------------------------------------------------------
    @property
    def optimizer(self):
        """The optimizer as ``trainer.signals`` reads it (Adam's second moments per model parameter):
        the torch AdamW itself under ZeRO-0 fp32 (its groups hold the model's parameters), else a view
        assembling ZeRO's partitioned states."""
        opt = self.ds.optimizer
        if isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["params"][0] is self._groups[0]["params"][0]:
            return opt
        if self._view is None:
            self._view = _FullOptimizerView(self.ds, self._groups)
        return self._view

    def _check_probe(self, probe) -> None:
        if probe is not None and self._partitioned and self.engine_cfg.deepspeed.offload_param == "nvme":
            raise ConfigError(
                "this controller asks for gradient signals; the gradient probe is not supported with partitioned "
                "ZeRO-3 parameters offloaded to nvme (engine.deepspeed.offload_param=nvme, untested): set "
                "engine.deepspeed.offload_param=cpu or none, or engine.deepspeed.zero3_whole_params=true, or use a "
                "loss-only controller"
            )

    def _begin_step(self, micro_batches: list[MicroBatch], probe) -> None:
        self._check_probe(probe)
        gas = self.ds.gradient_accumulation_steps()
        if len(micro_batches) != gas:
            raise ValueError(
                f"engine=deepspeed was configured for train.grad_accum={gas} micro-batches per step, got "
                f"{len(micro_batches)}"
            )

    def _training_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        self._training_forward = True
        try:
            return token_losses(self.ds, tokens)  # [b, T], fp32 (the loss is taken in fp32)
        finally:
            self._training_forward = False

    def _backward(self, objective: torch.Tensor) -> None:
        self.ds.backward(objective, scale_wrt_gas=False)

    def _after_micro_batch(self, last: bool) -> None:
        if not last:
            self.ds.step()  # not a boundary: DeepSpeed's micro-step bookkeeping only

    def _local_grad_norm(self) -> float | None:
        """ZeRO-0 fp32 clips in DeepSpeed without keeping the norm: take it from the (already
        all-reduced) .grad of every parameter, as the torch engine does."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.nn.utils.get_total_norm(grads))

    def optimizer_step(self, lr: float) -> float:
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "optimizer_step() outside an accumulation boundary: call forward_backward with train.grad_accum "
                "micro-batches first"
            )
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        before = self._local_grad_norm() if self.zero_stage == 0 and self.engine_cfg.precision == "fp32" else None
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = before
        return float("nan") if norm is None else float(norm)

    def state_dict(self) -> dict:
        """The full model weights (a collective with partitioned ZeRO-3 parameters: they are
        gathered). Optimizer states stay partitioned: the complete state goes through
        ``save_checkpoint``."""
        params = list(self.model.parameters())
        if self._partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        """Model weights only (a collective under ZeRO-3); DeepSpeed's fp32 master copies follow."""
        if set(state) - {"model"}:
            raise ValueError(
                "engine=deepspeed loads model weights only from a state dict; resume its optimizer "
                "through a DeepSpeed checkpoint (load_checkpoint)"
            )
        if self.zero_stage == 3:  # writes the partitions (ds_tensor), whole parameters or not
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0):
                if self.rank == 0:
                    self.model.load_state_dict(state["model"])
        else:
            with torch.no_grad():
                self.model.load_state_dict(state["model"])
        refresh = getattr(self.ds.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
        self._whole_params()

    # ---- DeepSpeed's own checkpoints ------------------------------------------------------------
    @classmethod
    def checkpoint_format(cls, engine_cfg) -> dict:
        return {
            "name": "deepspeed",
            "zero_stage": int(engine_cfg.deepspeed.zero_stage),
            "precision": engine_cfg.precision,
        }

    @classmethod
    def vet_checkpoint(cls, directory: Path, meta: dict) -> None:
        cls._vet_folder(directory, CHECKPOINT_SUBDIR)

    @classmethod
    def read_checkpoint(cls, directory: Path, meta: dict) -> dict:
        """Without DeepSpeed's engine (no process group): the loop's state from its client_state plus
        ``engine.model``, the full fp32 weights (ZeRO partitions merged by DeepSpeed's zero_to_fp32),
        so readers of ``state["engine"]["model"]`` work for every engine."""
        ds_dir = Path(directory) / CHECKPOINT_SUBDIR
        tag_dir = ds_dir / CHECKPOINT_TAG
        # rank 0's model states (the one carrying the loop's state): ZeRO-3 names them per rank
        names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
        name = next((n for n in names if (tag_dir / n).is_file()), None)
        if name is None:
            raise FileNotFoundError(f"{directory} is a DeepSpeed checkpoint without rank 0's model states in {tag_dir}")
        files = safe_load.load(tag_dir / name)
        state = dict(files.get(CLIENT_KEY) or {})
        if not any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO-0: the module holds the weights
            model = {k: v.float() for k, v in files["module"].items()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            safe_load.vet(ds_dir)  # zero_to_fp32 loads with weights_only=False
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
                model = dict(get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=CHECKPOINT_TAG))
        state["engine"] = {"model": model}
        return state

    def save_checkpoint(self, directory: Path, client_state: dict | None) -> None:
        """Collective: every rank writes its partitions under ``directory/deepspeed``; rank 0's
        ``client_state`` (the loop's state; None on the other ranks) goes into rank 0's model-states
        file (``mp_rank_00_model_states.pt``, or ``zero_pp_rank_0_mp_rank_00_model_states.pt``
        under ZeRO-3)."""
        self.ds.save_checkpoint(
            str(Path(directory) / CHECKPOINT_SUBDIR),
            tag=CHECKPOINT_TAG,
            client_state={CLIENT_KEY: client_state} if client_state is not None else {},
            save_latest=False,
        )

    def load_checkpoint(self, directory: Path) -> dict:
        """Collective: model, optimizer and ZeRO partitions from ``directory``; returns the loop's
        state saved with it (rank 0's client_state, broadcast: under ZeRO-3 every rank reads its own
        model-states file and only rank 0's carries the loop's state)."""
        safe_load.vet(Path(directory) / CHECKPOINT_SUBDIR)  # DeepSpeed loads with weights_only=False
        path, client = self.ds.load_checkpoint(
            str(Path(directory) / CHECKPOINT_SUBDIR),
            tag=CHECKPOINT_TAG,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        mine = client.get(CLIENT_KEY) if path is not None and client else None
        state = dist.broadcast_object(mine if self.rank == 0 else None)
        if state is None:
            raise FileNotFoundError(
                f"{directory} holds no loadable DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) with mixtrain's state"
            )
        self._whole_params()
        return state
