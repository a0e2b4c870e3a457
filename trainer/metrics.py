"""Every key the run logs, built in one place (metrics.jsonl, weights.jsonl and wandb share them).

Keys follow DESIGN.md and group by their first path segment in wandb:

- ``train/loss``, ``train/loss/<domain>``, ``train/grad_norm``, ``lr``: the step's training batch;
- ``mixture/weight/<domain>`` (the sampler's), ``mixture/learned/<domain>`` (the method's own),
  ``mixture/tokens/<domain>``, ``mixture/entropy``, ``mixture/loss_weight/<domain>``,
  ``mixture/excess_loss/<domain>``, ``mixture/<controller metric>``;
- ``probe/align/<reference>/<domain>``, ``probe/grad_norm/<domain>``: what the probe measured;
  ``probe/grad_var/<domain>`` (σ_k², the per-sequence gradient variance) and
  ``probe/noise_scale/<domain>`` (σ_k²/‖g_k‖², the simple gradient noise scale in sequences);
- ``eval/<domain>/loss``, ``eval/loss``, ``eval/macro_loss``, ``target/<set>/loss``: evaluation;
- ``curriculum/fraction``, ``curriculum/score[/<domain>]``, ``curriculum/proxy_loss``;
- ``perf/tokens_per_sec`` (global), ``perf/tokens_per_sec_per_device``, ``perf/mfu``,
  ``perf/peak_memory_gib`` (``trainer.throughput``).

"step" in every record = optimizer updates applied to the parameters it measures: a training loss
of record n is taken before update n, an evaluation after it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from mixtures import DomainStats

from .data.sampler import ShardPlan

TOKENS_PER_SEC = "perf/tokens_per_sec"
PROXY_LOSS = "curriculum/proxy_loss"
EVAL_LOSS = "eval/loss"
EVAL_MACRO = "eval/macro_loss"


def eval_key(domain: str) -> str:
    return f"eval/{domain}/loss"


def target_key(name: str) -> str:
    return f"target/{name}/loss"


def controller_metrics(metrics: dict) -> dict:
    return {f"mixture/{k}": float(v) for k, v in metrics.items()}


def step_record(
    step: int,
    lr: float,
    sums,
    counts,
    gnorm: float,
    stats: DomainStats,
    domains: list[str],
    weights: np.ndarray,
    tokens_seen: np.ndarray,
    req,
    lw: np.ndarray,
    learned,
) -> dict:
    """One optimizer step: losses, the mixture it trained on, and what the controller saw.
    ``learned``: the method's own distribution (differs from the sampler's in proxy mode), or None
    for a fixed mixture."""
    present = counts > 0
    rec = {"step": step, "lr": lr, "train/loss": float(sums.sum() / counts.sum()), "train/grad_norm": gnorm}
    w = weights
    for i, d in enumerate(domains):
        if present[i]:
            rec[f"train/loss/{d}"] = float(stats.loss[i])
        rec[f"mixture/weight/{d}"] = float(w[i])
        rec[f"mixture/tokens/{d}"] = float(tokens_seen[i])
    rec["mixture/entropy"] = float(-(w[w > 0] * np.log(w[w > 0])).sum())
    columns = {}
    if stats.align is not None:
        for r, name in enumerate(stats.align_names or req.align):
            columns[f"probe/align/{name}"] = stats.align[:, r]
    if stats.norms is not None:
        columns["probe/grad_norm"] = stats.norms
    if stats.grad_var is not None:
        columns["probe/grad_var"] = stats.grad_var
        if stats.norms is not None:  # B_simple = tr(Σ)/|G|², in sequences (McCandlish et al. 2018)
            with np.errstate(divide="ignore", invalid="ignore"):
                columns["probe/noise_scale"] = stats.grad_var / stats.norms**2
    if stats.excess_loss is not None:
        columns["mixture/excess_loss"] = stats.excess_loss
    for key, values in columns.items():
        for d, v in zip(domains, values):
            if np.isfinite(v):
                rec[f"{key}/{d}"] = float(v)
    if learned is not None:
        for d, v in zip(domains, learned):
            rec[f"mixture/learned/{d}"] = float(v)
    if not np.allclose(lw, 1.0):
        for d, v in zip(domains, lw):
            rec[f"mixture/loss_weight/{d}"] = float(v)
    return rec


def shard_record(step: int, plan: ShardPlan, weights: np.ndarray, domains: list[str]) -> dict:
    """One shard (a weights.jsonl row): its weights, counts and a hash of which samples it holds, in
    order (a replayed or skipped shard shows here)."""
    samples = hashlib.sha256(plan.domains.astype("<i2").tobytes() + plan.indices.astype("<i8").tobytes())
    rec = {
        "step": step,
        "shard": plan.shard_index,
        "weights": dict(zip(domains, map(float, weights))),
        "counts": dict(zip(domains, map(int, plan.counts))),
        "samples": samples.hexdigest()[:16],
    }
    if plan.scores is not None:
        rec["curriculum"] = curriculum_record(plan, domains)
    return rec


def curriculum_record(plan: ShardPlan, domains: list[str]) -> dict:
    """Per shard: the pacing fraction f(u) and the mean score of the samples drawn (per domain)."""
    out = {}
    if plan.fraction is not None:
        out["curriculum/fraction"] = float(plan.fraction)
    finite = np.isfinite(plan.scores)
    if finite.any():
        out["curriculum/score"] = float(plan.scores[finite].mean())
    for i, d in enumerate(domains):
        sel = finite & (plan.domains == i)
        if sel.any():
            out[f"curriculum/score/{d}"] = float(plan.scores[sel].mean())
    return out


def evaluation(groups: list[str], per_sequence: list[np.ndarray]) -> dict:
    """Mean loss per evaluation group, plus the token-weighted and macro averages over the domains."""
    out = {k: float(s.mean()) for k, s in zip(groups, per_sequence) if s.size}
    dom = [s for k, s in zip(groups, per_sequence) if k.startswith("eval/") and s.size]
    if dom:
        out[EVAL_LOSS] = float(np.concatenate(dom).mean())
        out[EVAL_MACRO] = float(np.mean([s.mean() for s in dom]))
    return out
