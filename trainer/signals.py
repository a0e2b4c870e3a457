"""Measurement for controllers: turns a controller's ``Request`` into ``DomainStats`` fields.

Per step, only what is requested is computed:

- reference gradients (``"heldout"``: a mixed batch from every domain's validation split;
  ``"target:<name>"``: a batch of the target set's few-shot pool), computed on the unwrapped model
  before the training backward, identical on every rank (same batch, same parameters);
- per-domain alignments / norms / Gram from the probe, inside the training backward
  (``source="in_batch"``) or on a separate per-domain probe batch (``source="probe_batch"``);
- per-domain excess loss against a frozen reference model on the training batch (DoReMi).

Batches drawn here are pure functions of (seed, step): a resumed run measures the same things.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from mixtures import Request

from . import checkpoint, dist
from .config import ConfigError, ModelConfig
from .data.domains import DataBundle, SequenceView
from .models import build_model, token_losses
from .probe import Probe, ProbeSpec

_REF_STREAM, _PROBE_STREAM = 3, 4


def _draw(view: SequenceView, n: int, rng: np.random.Generator) -> np.ndarray:
    return view.get(np.sort(rng.choice(len(view), size=n, replace=n > len(view))))


def load_reference_model(run_dir: str, data: DataBundle, device: torch.device) -> torch.nn.Module:
    """The final model of a previous mixtrain run (DoReMi's reference), frozen."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    ckpt = checkpoint.latest(run / "checkpoints")
    if not cfg_path.is_file() or ckpt is None:
        raise ConfigError(f"mixture.reference={run_dir!r} is not a finished mixtrain run (needs config.yaml and a checkpoint)")
    saved = yaml.safe_load(cfg_path.read_text())
    meta_tok = checkpoint.load_meta(ckpt).get("fingerprint", {}).get("tokenizer")
    if meta_tok is not None and meta_tok != data.tokenizer:
        raise ConfigError(f"mixture.reference={run_dir!r} was trained with tokenizer {meta_tok.get('name')}, "
                          f"this run uses {data.tokenizer.get('name')}")
    model = build_model(ModelConfig(**saved["model"]))
    state, _, _ = checkpoint.load(ckpt, rank=0)
    model.load_state_dict(state["engine"]["model"])
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Signals:
    def __init__(self, engine, data: DataBundle, seed: int, probe_cfg, reference: torch.nn.Module | None, global_batch: int):
        self.engine = engine
        self.global_batch = global_batch
        self.data = data
        self.seed = seed
        self.K = len(data.domains)
        self.reference = reference
        self.probe_cfg = probe_cfg
        self.probe = Probe(engine.model, self.K, exact_budget_bytes=int(probe_cfg.exact_budget_mb) << 20)
        self._excess = torch.zeros(2, self.K, dtype=torch.float64)

    # ---- reference gradients ----------------------------------------------------------------
    def _ref_batch(self, name: str, n: int, step: int, r: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, _REF_STREAM, step, r])
        if name == "heldout":
            views = [self.data.valid[d] for d in self.data.domains if d in self.data.valid]
            if not views:
                raise ConfigError("the 'heldout' reference needs validation splits; this data has none")
            per = np.bincount(np.arange(n) % len(views), minlength=len(views))
            return torch.from_numpy(np.concatenate([_draw(v, int(k), rng) for v, k in zip(views, per) if k]))
        if name.startswith("target:"):
            target = name.split(":", 1)[1]
            if target not in self.data.targets:
                raise ConfigError(f"reference {name!r}: no target set {target!r}; available: {sorted(self.data.targets)}")
            splits = self.data.targets[target]
            return torch.from_numpy(_draw(splits.get("train") or splits["valid"], n, rng))
        raise ConfigError(f"unknown reference gradient {name!r}; use 'heldout' or 'target:<name>'")

    def _reference_gradients(self, req: Request, step: int) -> tuple[list[list[torch.Tensor]], np.ndarray]:
        refs, norms = [], []
        model = self.engine.model
        for r, name in enumerate(req.align):
            n = req.ref_sequences or max(4, self.global_batch // (self.K + 1))
            batch = self._ref_batch(name, n, step, r).to(self.engine.device)
            grads = self.probe.reference_gradient(token_losses(model, batch).mean())
            refs.append(grads)
            norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
        return refs, np.array(norms)

    # ---- per step -----------------------------------------------------------------------------
    def begin(self, req: Request, step: int) -> dict:
        """Work before the training backward; returns what ``end`` needs."""
        state: dict = {"req": req}
        if req.ref_model_loss:
            if self.reference is None:
                raise ConfigError("the controller asks for reference-model losses but no mixture.reference model is loaded")
            self._excess.zero_()
        if req.any_gradient:
            refs, state["ref_norms"] = self._reference_gradients(req, step)
            spec = ProbeSpec(refs=len(refs), norms=req.norms or req.gram, gram=req.gram,
                             sketch_dim=self.probe_cfg.sketch_dim, seed=(self.seed * 1_000_003 + step) & 0x7FFFFFFF)
            self.probe.start(spec, refs or None)
        return state

    def in_batch_probe(self, state: dict) -> Probe | None:
        req = state["req"]
        return self.probe if req.any_gradient and req.source == "in_batch" else None

    def on_losses(self, state: dict):
        """Per-micro-batch hook for the engine (excess loss against the reference model), or None."""
        if not state["req"].ref_model_loss:
            return None

        @torch.no_grad()
        def hook(tokens: torch.Tensor, domains: torch.Tensor, losses: torch.Tensor) -> None:
            ref = token_losses(self.reference, tokens)
            excess = (losses.detach() - ref).clamp_min(0).double().sum(dim=1).cpu()
            self._excess[0].index_add_(0, domains.cpu(), excess)
            self._excess[1].index_add_(0, domains.cpu(), ref.double().sum(dim=1).cpu())

        return hook

    def _probe_batch(self, req: Request, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``probe_sequences`` per domain, split over ranks, rows sorted by domain."""
        rng = np.random.default_rng([self.seed, _PROBE_STREAM, step])
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist.active() else (0, 1)
        per_rank = -(-req.probe_sequences // world)
        rows, doms = [], []
        for d, view in enumerate(self.data.train):
            batch = _draw(view, per_rank * world, rng)[rank * per_rank : (rank + 1) * per_rank]
            rows.append(batch)
            doms.append(np.full(len(batch), d))
        return torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(doms))

    def end(self, state: dict, stats, step: int, loss_weights: np.ndarray, tokens_per_rank: int) -> None:
        """Fill the requested fields of ``stats`` (a DomainStats with global token counts)."""
        req = state["req"]
        if req.any_gradient:
            if req.source == "probe_batch":
                tokens, doms = self._probe_batch(req, step)
                tokens, doms = tokens.to(self.engine.device), doms
                params = [p for p in self.engine.model.parameters() if p.requires_grad]
                with self.probe.micro_batch(doms):
                    losses = token_losses(self.engine.model, tokens)
                    # autograd.grad, not backward: the probe sees every layer's backward while
                    # .grad (the training gradient) and the engine's reduction hooks stay untouched.
                    torch.autograd.grad(losses.sum() / losses.numel(), params)
                n = torch.bincount(doms, minlength=self.K).double() * tokens.shape[1]
                n_global = dist.all_reduce_sum(n).numpy()
                scale = losses.numel() / np.where(n_global > 0, n_global, np.nan)
            else:
                counts = stats.tokens
                scale = tokens_per_rank / np.where(counts > 0, loss_weights * counts, np.nan)
            result = self.probe.finish(scale)
            stats.align, stats.norms, stats.gram = result.align, result.norms, result.gram
            stats.ref_norms = state.get("ref_norms")
        if req.ref_model_loss:
            total = dist.all_reduce_sum(self._excess.clone()).numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                stats.excess_loss = total[0] / stats.tokens
                stats.ref_loss = total[1] / stats.tokens
