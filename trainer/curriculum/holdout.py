"""The curriculum proxy's holdout: a fixed share of every domain's training samples.

§4.2 of the controllers reference holds out 10% of each domain's *documents* by document hash.
mixtrain's training samples are not documents: a sample is a fixed-length slice of seq_len + 1
tokens cut from a domain's packed token stream (``SequenceView``; documents are packed back to back
and a sample may straddle several). The unit the main run draws and the scorer scores is that
slice, so the holdout is chosen per *sample*: sample j of domain ``name`` is held out iff

    h(name, j) / 2**64 < data.holdout_fraction,   h = splitmix64(blake2b_64(name) + (j + 1)·φ64)

a 64-bit hash of (domain name, sample index). Consequences, all deliberate:

- membership is fixed: independent of the seed, the world size, the other domains and the
  weights, and stable when a stream grows (appending data never moves an existing sample in or out);
- the share is ``holdout_fraction`` in expectation (a hash threshold, not an exact count);
- it depends on ``data.seq_len`` (that is what "sample j" means); the scores key records seq_len;
- neighbouring samples share one boundary token (``SequenceView``), so a held-out sample and a main
  sample may share a single token: negligible, and the price of not re-cutting the stream.

``data.subset`` picks the side: ``all`` (no restriction, the default), ``main`` (everything but the
holdout: the main run when a curriculum is on) or ``holdout`` (only the holdout: the proxy).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..config import SUBSETS, ConfigError

_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrap-around arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_hash(domain: str, n: int) -> np.ndarray:
    """Uniform doubles in [0, 1), one per sample index 0..n-1 of ``domain`` (a pure function)."""
    salt = np.uint64(int.from_bytes(hashlib.blake2b(domain.encode(), digest_size=8).digest(), "little"))
    with np.errstate(over="ignore"):
        x = salt + (np.arange(1, n + 1, dtype=np.uint64) * _GAMMA)
        h = _splitmix64(x)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def holdout_mask(domain: str, n: int, fraction: float) -> np.ndarray:
    """True where sample j of ``domain`` (n samples) belongs to the holdout."""
    if fraction <= 0:
        return np.zeros(n, dtype=bool)
    return sample_hash(domain, n) < fraction


def subset_pools(domains: list[str], sizes, fraction: float, subset: str) -> list[np.ndarray] | None:
    """Per-domain sorted sample indices that ``subset`` may draw; None = every sample (no pools).

    Raises ValueError naming the domain when a side is empty (a tiny domain and a small fraction
    can leave no holdout sample at all)."""
    if subset not in SUBSETS:
        raise ValueError(f"data.subset={subset!r}; allowed: {', '.join(SUBSETS)}")
    if subset == "all":
        return None
    pools = []
    for name, n in zip(domains, sizes):
        mask = holdout_mask(name, int(n), fraction)
        pool = np.flatnonzero(mask if subset == "holdout" else ~mask).astype(np.int64)
        if pool.size == 0:
            raise ValueError(
                f"data.holdout_fraction={fraction}: domain {name!r} ({int(n)} samples) has no "
                f"{'held-out' if subset == 'holdout' else 'main'} sample left under data.subset={subset}"
            )
        pools.append(pool)
    return pools


def config_pools(cfg, data, subset: str) -> list[np.ndarray] | None:
    """``subset_pools`` for a run's config and data; a refusal names the knobs."""
    try:
        return subset_pools(data.domains, data.train_samples, cfg.data.holdout_fraction, subset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
