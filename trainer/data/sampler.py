"""DomainSampler: turns domain weights into a deterministic plan of samples, one shard at a time.

A shard is a fixed number of global samples (a whole number of optimizer steps). At each shard
boundary the current weights become per-domain counts (largest-remainder rounding), each domain
supplies its next samples from a per-epoch permutation (its cursor advances), and the shard's
samples are interleaved by a permutation seeded with (seed, shard index). The plan is a pure
function of (seed, shard index, weights, cursors): every rank computes the same plan and takes its
own slice, and a resumed run recomputes exactly the plan it was in. Weights therefore act exactly
from the next shard boundary, never earlier and never later.

Two optional extensions, both off by default (the plain sampler is then bit-identical to one
without them):

- ``pools``: per domain, the sorted sample indices the sampler may draw (``data.subset``: the
  main run excludes the curriculum proxy's holdout, the proxy draws only the holdout). Epoch
  permutations, cursors and counts then run over pool positions 0..len(pool)-1 and the plan names
  the domain's original sample index ``pool[position]``, so "no repeat within an epoch", disjoint
  rank slices and purity hold on the restricted set exactly as on the full one.
- ``order``: a within-domain order (``trainer.curriculum.pacing``) replacing the epoch permutation.
  It keeps, per domain, the set of pool positions consumed in the current epoch (in the sampler
  state, so it is checkpointed with the cursors) and decides which unconsumed samples the shard's
  count for that domain takes. The cursor's ``position`` is then the number consumed this epoch,
  so the exhaustion policies work unchanged. The domain-level counts still come from the weights:
  an order composes with any controller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..config import POLICIES

_PERM_STREAM, _ORDER_STREAM = 1, 2  # separate RNG streams for epoch permutations and shard order


class DataExhausted(RuntimeError):
    """No valid plan: a domain ran out under ``exhaustion=stop`` or every domain ran out."""


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``weights * total`` (Hamilton apportionment).

    Ties in the remainders go to the lower domain index, so the result is deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    quota = w * total
    counts = np.floor(quota).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        order = np.lexsort((np.arange(w.size), -(quota - counts)))  # by remainder desc, then index
        counts[order[:short]] += 1
    return counts


@lru_cache(maxsize=64)
def epoch_permutation(seed: int, domain: int, epoch: int, size: int) -> np.ndarray:
    """The order in which a domain's samples are visited during one epoch (a pure function)."""
    perm = np.random.default_rng([seed, _PERM_STREAM, domain, epoch]).permutation(size)
    perm.setflags(write=False)
    return perm


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0  # samples of this epoch already consumed


@dataclass
class SamplerState:
    shard_index: int = 0
    cursors: list[Cursor] = field(default_factory=list)
    consumed: list[np.ndarray] | None = None
    """Only with a within-domain ``order``: per domain, a bool per pool position, True once drawn
    in the current epoch (reset when the epoch ends). Never mutated in place: plans copy it."""

    def to_dict(self) -> dict:
        d = {"shard_index": self.shard_index, "cursors": [[c.epoch, c.position] for c in self.cursors]}
        if self.consumed is not None:  # bit-packed, hex: small and JSON-safe
            d["consumed"] = [{"n": int(c.size), "bits": np.packbits(c).tobytes().hex()} for c in self.consumed]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplerState:
        consumed = None
        if d.get("consumed") is not None:
            consumed = [
                np.unpackbits(np.frombuffer(bytes.fromhex(c["bits"]), dtype=np.uint8), count=int(c["n"])).astype(bool)
                for c in d["consumed"]
            ]
        return cls(
            shard_index=int(d["shard_index"]),
            cursors=[Cursor(int(e), int(p)) for e, p in d["cursors"]],
            consumed=consumed,
        )


@dataclass
class Taken:
    """What a within-domain order drew for one domain in one shard."""

    positions: np.ndarray  # pool positions, in the order they are fed
    scores: np.ndarray  # float64 score of each drawn sample (NaN where none applies)
    cursor: Cursor  # the domain's cursor after the draw (position = consumed this epoch)
    consumed: np.ndarray  # the domain's consumed set after the draw (a new array)
    recorded: list = field(default_factory=list)  # externally computed scores used (replayed on resume)


class SampleOrder:
    """Within-domain order interface (see ``trainer.curriculum.pacing``).

    ``take`` must be a pure function of its arguments (and of ``score_fn``'s answers) and must
    consume every pool position exactly once per epoch."""

    def take(self, d: int, n: int, cursor: Cursor, consumed: np.ndarray, shard_index: int, score_fn=None) -> Taken:
        raise NotImplementedError

    def fraction(self, shard_index: int) -> float | None:
        """The share of unconsumed samples eligible at this shard (logged), if the order has one."""
        return None


@dataclass
class ShardPlan:
    """The global sample order of one shard; ``domains[j]``/``indices[j]`` name global sample j."""

    shard_index: int
    weights: np.ndarray
    counts: np.ndarray
    domains: np.ndarray  # int16 domain id per sample
    indices: np.ndarray  # int64 sample index within its domain
    next_state: SamplerState
    scores: np.ndarray | None = None  # with an order: float64 score per sample (NaN where none)
    fraction: float | None = None  # with a paced order: f(u) of this shard
    recorded: list | None = None  # with an online order: the candidate scores it was planned from

    def __len__(self) -> int:
        return int(self.domains.size)


class DomainSampler:
    """``sizes``: samples per domain (ignored when ``pools`` is given: the pool lengths are the
    sizes). ``pools``: optional per-domain sorted sample indices to draw from. ``order``: optional
    ``SampleOrder`` replacing the per-epoch permutation inside each domain. ``names``: the domains'
    names, for messages (default: their indices)."""

    def __init__(
        self,
        sizes,
        shard_size: int,
        seed: int,
        exhaustion: str = "cycle",
        pools=None,
        order: SampleOrder | None = None,
        names: list[str] | None = None,
    ):
        if exhaustion not in POLICIES:
            raise ValueError(f"data.exhaustion={exhaustion!r}; allowed: {', '.join(POLICIES)}")
        self.pools = None if pools is None else [np.asarray(p, dtype=np.int64) for p in pools]
        self.sizes = np.asarray(sizes if pools is None else [p.size for p in self.pools], dtype=np.int64)
        if np.any(self.sizes <= 0):
            raise ValueError("every domain needs at least one sample")
        self.shard_size = int(shard_size)
        self.seed = int(seed)
        self.exhaustion = exhaustion
        self.order = order
        self.names = [str(n) for n in names] if names is not None else [str(k) for k in range(self.K)]
        self.state = SamplerState(cursors=[Cursor() for _ in self.sizes], consumed=self._fresh_consumed())

    def _fresh_consumed(self) -> list[np.ndarray] | None:
        return None if self.order is None else [np.zeros(int(n), dtype=bool) for n in self.sizes]

    def pool(self, d: int) -> np.ndarray:
        """Domain d's drawable sample indices (all of them without pools)."""
        return np.arange(int(self.sizes[d]), dtype=np.int64) if self.pools is None else self.pools[d]

    @property
    def K(self) -> int:
        return int(self.sizes.size)

    def _counts(self, weights: np.ndarray, remaining: np.ndarray) -> np.ndarray:
        """Per-domain counts for the shard under the exhaustion policy."""
        S = self.shard_size
        if self.exhaustion == "cycle":
            return largest_remainder(weights, S)
        counts = largest_remainder(weights, S)
        if self.exhaustion == "stop":
            over = np.flatnonzero(counts > remaining)
            if over.size:
                k = int(over[0])
                raise DataExhausted(
                    f"domain {self.names[k]!r} has {int(remaining[k])} samples left in its first "
                    f"epoch but the next shard needs {int(counts[k])} (data.exhaustion=stop)"
                )
            return counts
        # renormalize: cap exhausted domains, hand their share to the others by weight, repeat.
        if remaining.sum() < S:
            raise DataExhausted(
                f"only {int(remaining.sum())} unseen samples remain for a shard of {S} (data.exhaustion=renormalize)"
            )
        w = np.where(remaining > 0, weights, 0.0)
        fixed = np.zeros(self.K, dtype=np.int64)
        free = remaining > 0
        while True:
            if w[free].sum() <= 0:  # only zero-weight domains have data left: spread evenly over them
                w = np.where(free, 1.0, 0.0)
            need = S - int(fixed.sum())
            counts = fixed + np.where(free, largest_remainder(np.where(free, w, 0.0), need), 0)
            over = free & (counts > remaining)
            if not over.any():
                return counts
            fixed[over] = remaining[over]
            free &= ~over

    def plan_shard(self, weights, state: SamplerState | None = None, score_fn=None) -> ShardPlan:
        """Plan the next shard from ``state`` (default: the sampler's own) without changing it.

        ``score_fn(domain, sample_indices) -> scores`` is passed to an online order (it may be a
        collective: every rank plans the same shard, so every rank calls it in the same sequence)."""
        state = state or self.state
        if self.order is not None:
            return self._plan_ordered(np.asarray(weights, dtype=np.float64), state, score_fn)
        weights = np.asarray(weights, dtype=np.float64)
        counts = self._counts(weights, self._remaining(state))

        parts_dom, parts_idx, cursors = [], [], []
        for d, (cur, n) in enumerate(zip(state.cursors, counts)):
            epoch, pos, n = cur.epoch, cur.position, int(n)
            taken = []
            while n > 0:
                perm = epoch_permutation(self.seed, d, epoch, int(self.sizes[d]))
                take = min(n, perm.size - pos)
                taken.append(perm[pos : pos + take] if self.pools is None else self.pools[d][perm[pos : pos + take]])
                pos, n = pos + take, n - take
                if pos == perm.size:  # epoch ends: the next one is a fresh deterministic reshuffle
                    epoch, pos = epoch + 1, 0
            cursors.append(Cursor(epoch, pos))
            if taken:
                idx = np.concatenate(taken)
                parts_idx.append(idx)
                parts_dom.append(np.full(idx.size, d, dtype=np.int16))
        # Shuffle which position holds which domain, then fill each domain's positions in cursor
        # order: the stream never shows a sample of epoch e+1 before the rest of epoch e.
        labels = np.concatenate(parts_dom)
        labels = labels[np.random.default_rng([self.seed, _ORDER_STREAM, state.shard_index]).permutation(labels.size)]
        indices = np.empty(labels.size, dtype=np.int64)
        indices[np.argsort(labels, kind="stable")] = np.concatenate(parts_idx)
        return ShardPlan(
            shard_index=state.shard_index,
            weights=weights.copy(),
            counts=counts,
            domains=labels,
            indices=indices,
            next_state=SamplerState(state.shard_index + 1, cursors),
        )

    def _remaining(self, state: SamplerState) -> np.ndarray:
        first_epoch = np.array([c.epoch == 0 for c in state.cursors])
        left = self.sizes - np.array([c.position for c in state.cursors], dtype=np.int64)
        return np.where(first_epoch, left, 0) if self.exhaustion != "cycle" else left

    def _plan_ordered(self, weights: np.ndarray, state: SamplerState, score_fn) -> ShardPlan:
        """The same plan structure with the within-domain choice delegated to ``self.order``."""
        if state.consumed is None or len(state.consumed) != self.K:
            raise ValueError(
                "sampler state carries no consumed sets: it was saved without the curriculum (curriculum.name)"
            )
        counts = self._counts(weights, self._remaining(state))
        parts_dom, parts_idx, parts_score, cursors, consumed, recorded = [], [], [], [], [], []
        for d, (cur, n) in enumerate(zip(state.cursors, counts)):
            got = self.order.take(d, int(n), cur, state.consumed[d], state.shard_index, score_fn)
            cursors.append(got.cursor)
            consumed.append(got.consumed)
            recorded.extend(got.recorded)
            if got.positions.size:
                parts_idx.append(self.pool(d)[got.positions])
                parts_dom.append(np.full(got.positions.size, d, dtype=np.int16))
                parts_score.append(np.asarray(got.scores, dtype=np.float64))
        labels = np.concatenate(parts_dom)
        labels = labels[np.random.default_rng([self.seed, _ORDER_STREAM, state.shard_index]).permutation(labels.size)]
        where = np.argsort(labels, kind="stable")
        indices = np.empty(labels.size, dtype=np.int64)
        indices[where] = np.concatenate(parts_idx)
        scores = np.empty(labels.size, dtype=np.float64)
        scores[where] = np.concatenate(parts_score)
        return ShardPlan(
            shard_index=state.shard_index,
            weights=weights.copy(),
            counts=counts,
            domains=labels,
            indices=indices,
            next_state=SamplerState(state.shard_index + 1, cursors, consumed),
            scores=scores,
            fraction=self.order.fraction(state.shard_index),
            recorded=recorded,
        )

    def advance(self, plan: ShardPlan) -> None:
        """Commit a plan: the cursors move past its samples."""
        self.state = plan.next_state

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, d: dict) -> None:
        state = SamplerState.from_dict(d)
        if len(state.cursors) != self.K:
            raise ValueError(f"sampler state has {len(state.cursors)} domains, the data has {self.K}")
        if (self.order is None) != (state.consumed is None):
            raise ValueError("sampler state and sampler disagree on the within-domain order (curriculum.name)")
        if state.consumed is not None and [c.size for c in state.consumed] != self.sizes.tolist():
            raise ValueError("sampler state's consumed sets do not match the domains' pool sizes")
        self.state = state


def rank_slice(start: int, global_batch: int, rank: int, world: int) -> slice:
    """Positions of one optimizer step's global batch that belong to ``rank`` (contiguous, disjoint)."""
    per_rank = global_batch // world
    s = start + rank * per_rank
    return slice(s, s + per_rank)
