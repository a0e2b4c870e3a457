"""The reference slice: a fixed share of each domain's training samples that controllers steer on
and the sampler never draws.

Controllers that need a held-out measure of generalisation (DoGE's universal target, the held-out
``mix`` of the official code; TiKMiX's per-domain influence tasks) must not take it from the
validation splits: evaluation reports those, so a mixture steered on them is graded on its own
target, a leak in its favour. The official DoGE code holds out part of every domain's *training*
data instead, and so does mixtrain: reference names ``heldout`` (a mix of every domain's slice) and
``heldout:<domain>`` (one domain's slice) draw from here.

Membership is a pure function of (domain name, number of samples, fraction): the
``max(1, ceil(fraction · n))`` samples with the smallest hash h("reference:" + domain, j) (the
curriculum holdout's hash, ``trainer.curriculum.holdout.sample_hash``, under another name, so the
two are independent). An exact count rather than a hash threshold, so a small domain still gets a
slice. Independent of the seed, the world size and the weights, so every rank and every resume
agrees. The slice is carved out only in runs whose controller asks for a held-out reference
(``Controller.references``); other runs draw from every sample, as before.
"""

from __future__ import annotations

import math

import numpy as np

from ..curriculum.holdout import sample_hash


def reference_slice(domain: str, n: int, fraction: float) -> np.ndarray:
    """Sorted sample indices of ``domain``'s reference slice (n samples in the domain)."""
    if n < 2:
        raise ValueError(f"domain {domain!r} has {n} training sample(s): too few to hold a reference slice out of it")
    count = min(n - 1, max(1, math.ceil(fraction * n)))
    order = np.argsort(sample_hash(f"reference:{domain}", n), kind="stable")
    return np.sort(order[:count]).astype(np.int64)


def uses_heldout(references) -> bool:
    """Whether reference names (``Controller.references``, wildcards included) need the slice."""
    return any(r == "heldout" or str(r).startswith("heldout:") for r in references)


def without(pools: list[np.ndarray] | None, sizes, slices: list[np.ndarray]) -> list[np.ndarray]:
    """Each domain's drawable indices (``pools``, or every sample when None) minus its slice."""
    full = pools if pools is not None else [np.arange(int(n), dtype=np.int64) for n in sizes]
    return [np.setdiff1d(p, s, assume_unique=True) for p, s in zip(full, slices)]
