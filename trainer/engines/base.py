"""The engine contract: build model and optimizer on a framework, run one training step.

The loop hands an engine micro-batches (token ids + a domain id per sequence) and per-domain loss
weights; the engine runs forward/backward with its framework's gradient reduction and returns this
rank's per-domain loss sums and token counts. Everything else (data, controllers, logging,
checkpoint layout) is the loop's.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint, safe_load


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, T+1] int64
    domains: torch.Tensor  # [b] int64, sorted so each domain's rows are contiguous
    """Ids >= the number of domains mark reference rows a probe measures in the same backward
    (``ProbeSpec.extra_groups``): they never enter the training loss, its gradient or the
    per-domain loss accounting (engines with ``fuses_reference_rows``)."""


class Engine(ABC):
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # the unwrapped module
    fuses_reference_rows = False
    """Whether forward_backward takes reference rows in its micro-batches (MicroBatch.domains)."""
    reshard_refusal: str | None = None
    """Why this engine's checkpoint cannot resume on another number of ranks (None: it can, the
    global batch kept: train.global_batch)."""
    skips_nonfinite = True
    """Whether optimizer_step leaves the parameters alone when the gradient norm is not finite (it
    checks the norm before stepping); an engine that learns the norm only after its step sets False."""
    weight_names = "mixtrain"
    """Whose parameter names :meth:`read_checkpoint`'s model weights carry: ``mixtrain`` (our models',
    what ``trainer.models.build_model`` loads) or ``megatron`` (megatron-core's GPTModel;
    ``trainer.models.hf`` maps both)."""

    def _join(self, engine_cfg) -> None:
        """Join the process group (if launched under torchrun), set intra-op threads and pick the
        device: the start of every engine's constructor."""
        from .. import dist

        self.rank, self.world_size, local = dist.init(engine_cfg.backend)
        if engine_cfg.threads:
            torch.set_num_threads(engine_cfg.threads)
        if engine_cfg.device == "cuda" or (engine_cfg.device == "auto" and torch.cuda.is_available()):
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")

    def forward_backward(
        self, micro_batches: list[MicroBatch], loss_weights: torch.Tensor, num_domains: int, probe=None, on_losses=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate gradients of mean-token loss (weighted per domain) over the micro-batches.

        ``probe``: a ``trainer.probe.Probe`` to record per-domain gradient pieces in the same
        backward; ``on_losses(tokens, domains, token_losses)``: called per micro-batch on its
        training rows (DoReMi's reference-model pass). Returns this rank's per-domain (sum of token
        losses, token count), both float64 [K].

        The one micro-batch loop of every engine; an engine overrides only the steps that differ:
        :meth:`_begin_step`, :meth:`_accumulating`, :meth:`_training_losses`, :meth:`_backward`,
        :meth:`_after_micro_batch`, :meth:`_end_step` and ``_accounts_losses``."""
        self._begin_step(micro_batches, probe)
        sums, counts, tokens_per_rank, lw = self._step_buffers(micro_batches, loss_weights, num_domains)
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            recording = probe.micro_batch(mb.domains) if probe is not None else contextlib.nullcontext()
            tokens, doms = mb.tokens.to(self.device), mb.domains.to(self.device)
            with self._accumulating(i == last), recording:
                losses = self._training_losses(tokens)  # [b, T], fp32
                objective = (losses.float() * lw[doms].unsqueeze(1)).sum() / tokens_per_rank
                self._backward(objective)
            self._after_micro_batch(i == last)
            if not self._accounts_losses:
                continue
            if on_losses is not None:
                train = mb.domains < num_domains
                if bool(train.all()):
                    on_losses(tokens, mb.domains, losses.detach())
                else:  # reference rows ride in this micro-batch: the hook sees the training rows only
                    on_device = train.to(tokens.device)
                    on_losses(tokens[on_device], mb.domains[train], losses.detach()[on_device])
            self._add_losses(sums, counts, mb.domains, losses)
        self._end_step()
        return sums, counts

    # ---- the steps of the micro-batch loop an engine may override --------------------------------
    _accounts_losses = True
    """Whether this rank returns loss sums (tensor-parallel ranks > 0 return zeros: each token
    counts once in the loop's all-reduce)."""

    def _begin_step(self, micro_batches: list[MicroBatch], probe) -> None:
        """Checks before the first micro-batch."""

    def _accumulating(self, last: bool):
        """The context of one micro-batch's forward/backward (DDP's no_sync before the last)."""
        return contextlib.nullcontext()

    def _training_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        from ..models import token_losses

        return token_losses(self.model, tokens)

    def _backward(self, objective: torch.Tensor) -> None:
        objective.backward()

    def _after_micro_batch(self, last: bool) -> None:
        """After a micro-batch's backward, outside the probe's recording."""

    def _end_step(self) -> None:
        """After the last micro-batch (a gradient reduction left to the end)."""

    def _step_buffers(self, micro_batches: list[MicroBatch], loss_weights: torch.Tensor, num_domains: int):
        """What a forward_backward starts from: zeroed per-domain (loss sums, token counts), this
        rank's tokens per step (every sequence is full length; normalising by it makes the gradient
        reduction's mean over ranks the mean over all tokens of the step) and the loss weights on
        the device."""
        zeros = lambda: torch.zeros(num_domains, dtype=torch.float64)  # noqa: E731
        tokens_per_rank = sum(int((mb.domains < num_domains).sum()) * (mb.tokens.shape[1] - 1) for mb in micro_batches)
        groups = max([num_domains] + [int(mb.domains.max()) + 1 for mb in micro_batches])
        # reference rows (ids >= K) weigh 1 in the objective: the probe rescales their pieces itself
        lw = torch.ones(groups, dtype=torch.float32)
        lw[:num_domains] = loss_weights.to(torch.float32)
        return zeros(), zeros(), tokens_per_rank, lw.to(self.device)

    @staticmethod
    def _add_losses(sums: torch.Tensor, counts: torch.Tensor, domains: torch.Tensor, losses: torch.Tensor) -> None:
        """Add a micro-batch's token losses [b, T] to the per-domain sums and counts (training rows only)."""
        train = domains < sums.numel()
        per_seq = losses.detach()[train.to(losses.device)].double().sum(dim=1).cpu()
        sums.index_add_(0, domains[train], per_seq)
        counts.index_add_(0, domains[train], torch.full_like(per_seq, losses.shape[1]))

    @abstractmethod
    def optimizer_step(self, lr: float) -> float:
        """Clip, step, zero gradients; returns the global gradient norm before clipping. With a
        non-finite norm an engine that ``skips_nonfinite`` only zeroes the gradients."""

    def discard_gradients(self) -> None:
        """Drop the accumulated gradients without stepping (a skipped step whose loss is not finite);
        only engines that ``skips_nonfinite`` are asked to."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop a step's gradients")

    def load_model_weights(self, weights: dict) -> None:
        """Replace the model's weights with ``weights`` (full fp32 tensors under the model's own names,
        as ``read_checkpoint`` gives them); the optimizer is untouched (train.init_from)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load model weights alone")

    @abstractmethod
    def state_dict(self) -> dict:
        """Model and optimizer state (rank 0's is saved)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    # ---- checkpoints: each engine owns the on-disk format of its part ---------------------------
    @classmethod
    def checkpoint_format(cls, engine_cfg) -> dict | None:
        """meta.json's ``engine`` entry: what a resume must match (None: the plain layout below)."""
        return None

    def save_checkpoint(self, directory: Path, client_state: dict | None) -> None:
        """Collective: write this engine's part (model, optimizer) and rank 0's ``client_state``
        (every other part of the checkpoint; None on the other ranks) into ``directory``. The plain
        layout: rank 0 writes both into one ``state.pt``, the engine's under ``"engine"``."""
        if client_state is not None:
            torch.save({**client_state, "engine": self.state_dict()}, Path(directory) / checkpoint.STATE_FILE)

    def load_checkpoint(self, directory: Path) -> dict:
        """Collective where the save was: load this engine's part from ``directory`` and return the
        client state saved with it."""
        state = dict(safe_load.load(Path(directory) / checkpoint.STATE_FILE))
        self.load_state_dict(state.pop("engine"))
        return state

    @classmethod
    def vet_checkpoint(cls, directory: Path, meta: dict) -> None:
        """Read every file of this format a restart reads (before anything is built), raising on the
        first that fails: a damaged checkpoint is found while an older one can still be taken."""
        path = Path(directory) / checkpoint.STATE_FILE
        if not path.is_file():
            raise checkpoint.DamagedCheckpoint(f"no {checkpoint.STATE_FILE}")
        safe_load.load(path, mmap=True)  # the zip and the pickle, not the tensors: load_checkpoint reads them

    @staticmethod
    def _vet_folder(directory: Path, name: str) -> None:
        """An engine's own folder of a checkpoint: there, and naming nothing but data (its files are
        loaded with weights_only=False by the framework: ``safe_load.vet``)."""
        folder = Path(directory) / name
        if not folder.is_dir():
            raise checkpoint.DamagedCheckpoint(f"no {name}/ folder")
        safe_load.vet(folder)

    @classmethod
    def read_checkpoint(cls, directory: Path, meta: dict) -> dict:
        """Without a process group (a reference or scoring model, an export): the client state with
        ``state["engine"]["model"]``, the full fp32 model weights under :attr:`weight_names`' names."""
        return safe_load.load(Path(directory) / checkpoint.STATE_FILE)

    @torch.no_grad()
    def sequence_loss_sums(self, batch: torch.Tensor) -> torch.Tensor:
        """Per sequence, the sum of token losses of an evaluation batch [b, T+1] on this rank
        (float64 [b] on the CPU; every sequence has T loss tokens)."""
        from ..models import token_losses

        was = self.model.training
        self.model.eval()
        try:
            loss = token_losses(self.model, batch.to(self.device))
        finally:
            self.model.train(was)
        return loss.double().sum(dim=1).cpu()


ENGINES: dict[str, type[Engine]] = {}


def register(name: str):
    def deco(cls):
        ENGINES[name] = cls
        return cls

    return deco
