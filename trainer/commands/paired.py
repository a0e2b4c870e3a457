"""Paired differences between runs evaluated on the same sequences.

Every mixtrain run keeps its final evaluation sequence by sequence (``eval_sequences.npz``: per
evaluation group, each fixed evaluation sequence's mean token loss, in the same order for every
run on the same data). Two runs are compared on a metric over groups G (the macro over the
domains, or one target set) as follows, for the seeds s = 1..S both conditions ran:

    δ_s,g,j = loss_a(s, g, j) − loss_b(s, g, j)          (sequence j of group g, seed s)
    D_s     = mean_g mean_j δ_s,g,j                      (the metric's difference at seed s)
    Δ       = mean_s D_s

with two independent sources of error: which sequences the evaluation happened to hold, and which
training seed each condition ran. Their variances add:

    SE_seq²  = (1/|G|²) Σ_g var_j(δ̄_g,j) / n_g,   δ̄_g,j = mean_s δ_s,g,j   (sequences, seeds averaged)
    SE_seed² = var_s(D_s) / S                                                 (0 with one seed)
    SE       = sqrt(SE_seq² + SE_seed²)

Pairing cancels what both runs share (the difficulty of each sequence, the initialisation of a
seed), which is why a paired SE is several times smaller than the spread of either run's loss.
A difference counts as resolved when |Δ| ≥ 2 SE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEQUENCES = "eval_sequences.npz"


@dataclass(frozen=True)
class PairedDiff:
    mean: float
    """Δ: mean over seeds of the metric's difference (a − b)."""
    se: float
    """Its standard error, sqrt(se_seq² + se_seed²)."""
    se_seq: float
    se_seed: float
    seeds: tuple

    def resolved(self, k: float = 2.0) -> bool:
        """Whether |Δ| is at least ``k`` standard errors (and not zero: two identical runs resolve nothing)."""
        return self.mean != 0 and abs(self.mean) >= k * self.se

    @property
    def z(self) -> float:
        return self.mean / self.se if self.se > 0 else math.copysign(math.inf, self.mean) if self.mean else 0.0


def load_sequences(run: Path) -> dict[str, np.ndarray] | None:
    """The run's per-sequence final evaluation ({group key: losses}), or None if it has none."""
    path = Path(run) / SEQUENCES
    if not path.is_file():
        return None
    with np.load(path) as z:
        return {k: np.asarray(z[k], dtype=np.float64) for k in z.files}


def metric(groups: dict[str, np.ndarray], keys: list[str]) -> float:
    """The mean over ``keys`` of each group's mean sequence loss (the macro when keys are the domains)."""
    return float(np.mean([groups[k].mean() for k in keys]))


def paired_difference(a: dict, b: dict, keys: list[str]) -> PairedDiff:
    """Δ and its SE for the metric over ``keys`` between conditions a and b, each {seed: {group key:
    per-sequence losses}}; only the seeds both ran count."""
    seeds = tuple(sorted(set(a) & set(b), key=str))
    if not seeds:
        raise ValueError("the two conditions share no seed: nothing to pair")
    deltas = []
    for s in seeds:
        row = {}
        for k in keys:
            if a[s][k].shape != b[s][k].shape:
                raise ValueError(
                    f"{k}: seed {s} was evaluated on {a[s][k].size} vs {b[s][k].size} sequences; "
                    "paired differences need the same evaluation sequences (data.eval_sequences)"
                )
            row[k] = a[s][k] - b[s][k]
        deltas.append(row)
    per_seed = np.array([metric(row, keys) for row in deltas])
    se_seq2 = 0.0
    for k in keys:
        mean_over_seeds = np.mean([row[k] for row in deltas], axis=0)
        if mean_over_seeds.size > 1:
            se_seq2 += mean_over_seeds.var(ddof=1) / mean_over_seeds.size
    se_seq2 /= len(keys) ** 2
    se_seed2 = per_seed.var(ddof=1) / per_seed.size if per_seed.size > 1 else 0.0
    return PairedDiff(
        mean=float(per_seed.mean()),
        se=math.sqrt(se_seq2 + se_seed2),
        se_seq=math.sqrt(se_seq2),
        se_seed=math.sqrt(se_seed2),
        seeds=seeds,
    )
