"""Within-domain orders for the irreducible curriculum (controllers reference §4.2 "pacing").

Both orders plug into ``DomainSampler(order=...)``: the domain-level controller still decides how
many samples each domain supplies to a shard; the order only decides *which* of the domain's
not-yet-consumed samples they are. Every sample is consumed exactly once per epoch (the consumed
set lives in the sampler state and resets when the epoch ends), so a curriculum reorders an epoch
and never repeats or drops a sample within it (§4.3: "a pacing that never widens repeats the same
high-score pool" cannot happen).

``ScoreOrder`` (``curriculum=irreducible``): static learnability scores from ``mixtrain score``.
At training fraction u (the shard's first step / train.steps) the eligible set is the top

    f(u) = f0 + (1 − f0) · min(1, u / u_full)        (f0 = 0.25, u_full = 0.5 by default)

of the domain's not-yet-consumed samples by score, and the shard's count for the domain is drawn
uniformly among the eligible without replacement, with an RNG seeded by (seed, shard index,
domain, epoch). Past u_full every unconsumed sample is eligible (a uniform draw of the rest).

``OnlineOrder`` (``curriculum=irreducible_online``, §4.2's "[reconstructed]" online variant): a
candidate pool of ``pool_factor`` × the count is drawn uniformly from the unconsumed samples,
scored by the caller's ``score_fn`` (the online proxy: ℓ(previous snapshot) − ℓ(current proxy)),
and the top-scoring ``count`` of the pool are taken.

Scores are only compared inside one domain (§4.3: they are not comparable across domains).
Non-finite scores (NaN: unscored) rank below every finite score.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ORDERS
from ..data.sampler import Cursor, SampleOrder, Taken

_PACE_STREAM, _POOL_STREAM = 5, 6  # the sampler uses 1 and 2, the signals 3 and 4


def pacing_fraction(u: float, f0: float, u_full: float) -> float:
    """f(u) = f0 + (1 − f0)·min(1, u/u_full): the eligible share of the unconsumed samples."""
    return float(f0 + (1.0 - f0) * min(1.0, max(0.0, u) / u_full))


def _rank_key(scores: np.ndarray) -> np.ndarray:
    """Scores as a sort key where non-finite values come last."""
    s = np.asarray(scores, dtype=np.float64)
    return np.where(np.isfinite(s), s, -np.inf)


class ScoreOrder(SampleOrder):
    """Paced learnability order from fixed per-sample scores.

    ``scores[d]``: float array over domain d's full sample index (as ``mixtrain score`` writes it);
    ``pools[d]``: the sample indices the sampler draws (position p is sample ``pools[d][p]``).
    ``steps_per_shard`` and ``total_steps`` turn a shard index into u = first step / total steps.
    ``order='anti'`` is the paper's anti-curriculum baseline (least learnable first)."""

    def __init__(
        self,
        scores: list[np.ndarray],
        pools: list[np.ndarray],
        *,
        seed: int,
        steps_per_shard: int,
        total_steps: int,
        f0: float = 0.25,
        u_full: float = 0.5,
        order: str = "learnable_first",
    ):
        if order not in ORDERS:
            raise ValueError(f"curriculum.order={order!r}; allowed: {', '.join(ORDERS)}")
        self.seed, self.f0, self.u_full = int(seed), float(f0), float(u_full)
        self.steps_per_shard, self.total_steps = int(steps_per_shard), int(total_steps)
        self.scores, self.ranked = [], []
        for s, pool in zip(scores, pools):
            s = np.asarray(s, dtype=np.float64)[pool]
            key = _rank_key(s if order == "learnable_first" else np.where(np.isfinite(s), -s, np.nan))
            self.scores.append(s)
            # best first; equal keys: lower position first (deterministic)
            self.ranked.append(np.lexsort((np.arange(s.size), -key)).astype(np.int64))

    def fraction(self, shard_index: int) -> float:
        u = shard_index * self.steps_per_shard / self.total_steps
        return pacing_fraction(u, self.f0, self.u_full)

    def take(self, d, n, cursor, consumed, shard_index, score_fn=None) -> Taken:
        f = self.fraction(shard_index)
        consumed = consumed.copy()
        epoch, out = cursor.epoch, []
        ranked = self.ranked[d]
        while n > 0:
            rest = ranked[~consumed[ranked]]  # unconsumed positions, best first
            m = rest.size
            take = min(n, m)
            # eligible = the top f(u) of the unconsumed (never fewer than the draw itself)
            k = min(m, max(take, math.ceil(f * m - 1e-9)))
            rng = np.random.default_rng([self.seed, _PACE_STREAM, shard_index, d, epoch])
            pick = rest[:k][rng.choice(k, size=take, replace=False)]
            consumed[pick] = True
            out.append(pick)
            n -= take
            if consumed.all():  # epoch ends: every sample was drawn once; the next epoch starts fresh
                epoch += 1
                consumed[:] = False
        positions = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        return Taken(positions, self.scores[d][positions], Cursor(epoch, int(consumed.sum())), consumed)


class OnlineOrder(SampleOrder):
    """Top-of-a-random-pool order with scores computed at plan time by ``score_fn``.

    For a count n (of the epoch's m unconsumed samples): a pool of min(m, pool_factor·n) is drawn
    uniformly (seeded by (seed, shard index, domain, epoch)), ``score_fn(d, sample_indices)``
    scores it, and the n best are taken; equal scores keep the pool's random order, so a proxy
    that cannot yet tell samples apart (all scores 0 at the first shard) gives a uniform draw. When
    n ≥ m the epoch's remaining samples are all taken without scoring (there is nothing to choose).
    The scores used are returned in ``Taken.recorded`` so a resumed run can replay the shard."""

    def __init__(self, pools: list[np.ndarray], *, seed: int, pool_factor: int = 4):
        self.pools = pools
        self.seed, self.pool_factor = int(seed), int(pool_factor)

    def take(self, d, n, cursor, consumed, shard_index, score_fn=None) -> Taken:
        if score_fn is None and n > 0:
            raise ValueError("the online curriculum needs a score_fn to plan a shard")
        consumed = consumed.copy()
        epoch, out, out_scores, recorded = cursor.epoch, [], [], []
        while n > 0:
            rest = np.flatnonzero(~consumed)
            m = rest.size
            take = min(n, m)
            rng = np.random.default_rng([self.seed, _POOL_STREAM, shard_index, d, epoch])
            if take == m:
                pick, sc = rest[rng.permutation(m)], np.full(m, np.nan)
            else:
                cand = rest[rng.choice(m, size=min(m, self.pool_factor * take), replace=False)]
                s = np.asarray(score_fn(d, self.pools[d][cand]), dtype=np.float64)
                if s.shape != cand.shape:
                    raise ValueError(f"score_fn returned {s.shape[0]} scores for {cand.size} candidates")
                recorded.append(s)
                best = np.argsort(-_rank_key(s), kind="stable")[:take]
                pick, sc = cand[best], s[best]
            consumed[pick] = True
            out.append(pick)
            out_scores.append(sc)
            n -= take
            if consumed.all():
                epoch += 1
                consumed[:] = False
        positions = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        scores = np.concatenate(out_scores) if out_scores else np.empty(0)
        return Taken(positions, scores, Cursor(epoch, int(consumed.sum())), consumed, recorded)


def replay(recorded: list) -> callable:
    """A score_fn answering with previously recorded scores, in order (resume of an online shard)."""
    it = iter(recorded)

    def score_fn(d, indices):
        try:
            s = np.asarray(next(it), dtype=np.float64)
        except StopIteration:
            raise ValueError("the checkpoint holds fewer recorded curriculum scores than the shard needs") from None
        if s.size != len(indices):
            raise ValueError("recorded curriculum scores do not match the shard being replayed")
        return s

    return score_fn
