"""FSDP2 engine (``engine=fsdp``): ``torch.distributed.fsdp.fully_shard`` on every block and then
on the whole model (embeddings, final norm and head, a tied matrix included), the torch-native
sharded data parallelism of torchtitan.

- Parameters, gradients and AdamW state live sharded (DTensors, dim 0 over the ranks); each block's
  parameters are all-gathered for its forward and again for its backward (after
  ``engine.fsdp.reshard_after_forward``), and its gradients reduce-scattered after its backward.
- engine.precision=bf16 is FSDP's MixedPrecisionPolicy: parameters gathered in bf16, compute in
  bf16, gradients reduce-scattered in fp32 into the fp32 shards the optimizer steps (no autocast).
- Accumulation: ``set_requires_gradient_sync(False)`` before the last micro-batch (FSDP's no_sync:
  gradients accumulate unsharded, one reduce-scatter per step).
- The probe: inside a probed layer's backward the weight is FSDP's gathered (unsharded) parameter
  and its per-domain pieces are full-shaped gradients of this rank's rows, taken before the
  reduce-scatter; ``Probe`` maps the gathered parameter to its slot by the module that holds it.
  Alignments need the full reference on every rank (R x P floats; computed by one ordinary backward
  whose reduce-scatter averages the identical reference batch of every rank, then gathered), then
  reduce K x R scalars; exact norms/Gram reduce K x P accumulators while the budget allows, a
  sketch of K x m otherwise: the probe's tiers, unchanged.
- Checkpoints: the plain layout (rank 0's ``state.pt``) with the FULL model and optimizer state
  gathered by ``torch.distributed.checkpoint.state_dict`` (keys by parameter name): every rank
  takes part in the gather and loads its shard back from the full state, so a resume may change
  nothing but must not change the number of ranks silently (meta.json records the layout).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as tdist

from ..config import EngineConfig, ModelConfig, TrainConfig
from ..models import build_model
from .base import register
from .torch_ddp import TorchEngine, adamw


@register("fsdp")
class FSDPEngine(TorchEngine):
    """The torch engine's optimizer step (clipping on the sharded gradients' global norm), loss path
    and reference-row fusion, on a fully sharded model."""

    def __init__(self, engine_cfg: EngineConfig, model_cfg: ModelConfig, train_cfg: TrainConfig):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._join(engine_cfg)
        if not tdist.is_initialized():
            # one process without torchrun: FSDP's collectives need a group all the same
            tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
        self.train_cfg, self.engine_cfg = train_cfg, engine_cfg
        torch.manual_seed(train_cfg.seed)  # the same full weights on every rank before each keeps its shard
        self.model = build_model(model_cfg).to(self.device)
        self.model.configure(engine_cfg, autocast=False)
        bf16 = engine_cfg.precision == "bf16"
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
        )
        reshard = bool(engine_cfg.fsdp.reshard_after_forward)
        for block in self.model.blocks:
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(self.model, mp_policy=policy, reshard_after_forward=reshard)
        self.wrapped = self.model  # FSDP2 shards in place: the module is its own wrapper
        self.optimizer = adamw(self.model, train_cfg)

    # ---- the micro-batch loop ------------------------------------------------------------------
    def _accumulating(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # ---- checkpoints ---------------------------------------------------------------------------
    _OPTIONS = dict(full_state_dict=True, cpu_offload=True)

    def state_dict(self) -> dict:
        """Collective: the full model and optimizer state (on rank 0; the other ranks get empty
        dicts from the gather)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer, options=StateDictOptions(**self._OPTIONS))
        return {"model": model, "optimizer": optim}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )

    def load_model_weights(self, weights: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True))

    @classmethod
    def checkpoint_format(cls, engine_cfg) -> dict | None:
        # the optimizer state is keyed by parameter name (the torch engine's by position): another layout
        return {"name": "fsdp"}

    def save_checkpoint(self, directory, client_state: dict | None) -> None:
        engine_state = self.state_dict()  # every rank gathers
        if client_state is not None:
            from .. import checkpoint

            torch.save({**client_state, "engine": engine_state}, Path(directory) / checkpoint.STATE_FILE)
