"""The online irreducible curriculum (``curriculum=irreducible_online``).

Controllers reference §4.2 lists an online variant as "[reconstructed]": no code or method section
was available, so this is mixtrain's reading of it, written down here.

- A proxy model (``curriculum.proxy_model``, small) is trained alongside the main model on the
  holdout only (``data.holdout_fraction`` of each domain, never drawn by the main run): one proxy
  optimizer step per main step, on a holdout batch of ``proxy_micro_batch`` sequences per rank drawn
  by its own DomainSampler with uniform domain weights (pure plans, like the main sampler's). Its
  learning rate follows the main schedule's shape with peak ``proxy_lr``. It is data parallel like
  the main model (DDP), so every rank holds the same proxy.
- At each shard boundary, for each domain, a candidate pool of ``pool_factor`` (4) × the shard's
  count for the domain is drawn uniformly from the domain's not-yet-consumed samples and scored

      s(x) = ℓ(x; proxy snapshot taken at the previous shard boundary) − ℓ(x; current proxy),

  ℓ = mean per-token loss of the packed sample as the main run sees it; the top ``count`` of the
  pool are drawn (``pacing.OnlineOrder``). Then the snapshot is replaced by the current proxy. At the
  first shard the snapshot equals the proxy (all scores 0), so the first shard is a uniform draw.
- Scoring is split over ranks (rank r scores candidates r, r+W, ...) and summed, so every rank
  plans from the same scores; the scores a shard was planned from are kept with the checkpoint and
  replayed on resume, together with the proxy model, its optimizer, its snapshot and its sampler
  state, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from .. import dist
from ..callbacks import Callback, register
from ..config import Config, ModelConfig
from ..data.sampler import DomainSampler, SamplerState, ShardPlan
from ..engines.base import MicroBatch
from ..metrics import PROXY_LOSS
from ..models import token_losses
from ..schedule import lr_at
from .holdout import config_pools

PROXY_SEED_OFFSET = 1_000_003  # the proxy's init and holdout order use seed + this: independent of the main run's


def proxy_model_config(cfg: Config) -> ModelConfig:
    """The proxy's model: ``curriculum.proxy_model`` over ModelConfig defaults; the vocabulary and
    context follow the resolved main model (same tokenizer, same seq_len)."""
    knobs = dict(cfg.curriculum.proxy_model)
    knobs.setdefault("max_seq_len", cfg.model.max_seq_len)
    knobs["vocab_size"] = cfg.model.vocab_size
    model = ModelConfig(**knobs)
    model.validate()
    return model


class OnlineProxy(Callback):
    """The curriculum as a callback: it scores each shard's candidates, steps the proxy after every
    main step, and resumes through the checkpoint's map (``"curriculum"``)."""

    name = "curriculum"

    def __init__(self, cfg: Config, data, holdout_pools: list[np.ndarray], rank: int, world: int):
        from ..engines.torch_ddp import TorchEngine

        self.cfg, self.data, self.rank, self.world = cfg, data, rank, world
        self.K = len(data.domains)
        c = cfg.curriculum
        micro = c.proxy_micro_batch or cfg.train.micro_batch
        self.train_cfg = dataclasses.replace(
            cfg.train,
            lr=c.proxy_lr,
            min_lr=c.proxy_lr / 10,
            micro_batch=micro,
            grad_accum=1,
            seed=cfg.train.seed + PROXY_SEED_OFFSET,
        )
        self.model_cfg = proxy_model_config(cfg)
        self.engine = TorchEngine(cfg.engine, self.model_cfg, self.train_cfg)
        self.snapshot = copy.deepcopy(self.engine.model).eval()
        for p in self.snapshot.parameters():
            p.requires_grad_(False)
        self.global_batch = micro * world
        self.sampler = DomainSampler(
            None, cfg.data.steps_per_shard * self.global_batch, seed=self.train_cfg.seed, pools=holdout_pools
        )
        self.plan: ShardPlan | None = None
        self.start_state: SamplerState | None = None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.engine.model.parameters())

    # ---- shard boundary -----------------------------------------------------------------------
    def score_fn(self):
        return self.score

    def on_shard(self, loop, plan, record: dict) -> None:
        # candidates were scored by ℓ(snapshot) − ℓ(proxy); now the proxy becomes the snapshot
        self.next_shard()
        self.take_snapshot()

    def on_step(self, loop, record: dict, stats) -> None:
        record[PROXY_LOSS] = self.train_step(loop.step, lr_at)

    def next_shard(self) -> None:
        """Plan the proxy's holdout batches for the coming shard (uniform domain weights)."""
        self.start_state = self.sampler.state
        self.plan = self.sampler.plan_shard(np.full(self.K, 1.0 / self.K))
        self.sampler.advance(self.plan)

    @torch.no_grad()
    def score(self, d: int, indices: np.ndarray) -> np.ndarray:
        """ℓ(x; snapshot) − ℓ(x; proxy) for domain d's samples ``indices`` (collective: every rank
        calls it with the same arguments and gets the same answer)."""
        n = len(indices)
        device = self.engine.device
        out = torch.zeros(n, dtype=torch.float64, device=device)
        mine = np.arange(self.rank, n, self.world)
        model = self.engine.model
        was = model.training
        model.eval()
        try:
            bs = self.cfg.curriculum.score_batch
            for s in range(0, mine.size, bs):
                rows = mine[s : s + bs]
                toks = torch.from_numpy(self.data.train[d].get(indices[rows])).to(device)
                before = token_losses(self.snapshot, toks).double().mean(dim=1)
                now = token_losses(model, toks).double().mean(dim=1)
                out[torch.from_numpy(rows).to(device)] = before - now
        finally:
            model.train(was)
        return dist.all_reduce_sum(out).cpu().numpy()

    def take_snapshot(self) -> None:
        """The current proxy becomes the 'previous' model of the next shard's scores."""
        self.snapshot.load_state_dict(self.engine.model.state_dict())

    # ---- training -----------------------------------------------------------------------------
    def train_step(self, step: int, lr_at) -> float:
        """One proxy optimizer step on this step's holdout batch; returns its mean token loss."""
        pos = (step % self.cfg.data.steps_per_shard) * self.global_batch
        tokens, doms = self.data.step_rows(self.plan, pos, self.global_batch, self.rank, self.world)
        order = np.argsort(doms, kind="stable")
        mb = MicroBatch(torch.from_numpy(tokens[order]), torch.from_numpy(doms[order]))
        sums, counts = self.engine.forward_backward([mb], torch.ones(self.K, dtype=torch.float64), self.K)
        self.engine.optimizer_step(lr_at(step, self.train_cfg))
        reduced = dist.all_reduce_sum(torch.cat([sums, counts])).numpy()
        return float(reduced[: self.K].sum() / reduced[self.K :].sum())

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "engine": self.engine.state_dict(),
            "snapshot": self.snapshot.state_dict(),
            "shard_start_state": None if self.start_state is None else self.start_state.to_dict(),
            "state": self.sampler.state.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        self.snapshot.load_state_dict(state["snapshot"])
        if state["shard_start_state"] is not None:
            self.sampler.load_state_dict(state["shard_start_state"])
            self.next_shard()  # re-plan the shard in progress: the same pure function
        else:
            self.sampler.load_state_dict(state["state"])


@register
def _online_curriculum(loop) -> OnlineProxy | None:
    cfg = loop.cfg
    if cfg.curriculum.name != "irreducible_online":
        return None
    return OnlineProxy(cfg, loop.data, config_pools(cfg, loop.data, "holdout"), loop.rank, loop.world)
