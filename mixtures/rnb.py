"""R&B: data mixture balancing over rounds of training steps (controllers.md §8.6).

Source: Ge et al., arXiv 2505.00358 (the "Balance" step); no public code was found. Over a round
of ``round_steps`` training steps the trainer sums each domain's gradient from the ordinary
training batches (``Request.accumulate``; the last block of the model by default, the paper's cheap
final-layer gradients) and, on the round's last step, gives the K×K Gram G of the per-domain mean
gradients over the whole round (G_ij = ⟨g_i, g_j⟩ / (|S_i| |S_j|) for the per-domain sums over the
sample sets S_i). Then

    p_{t+1} = softmax( λ · G p_t / ‖G p_t‖₂ )

an overwrite of p, not a multiplicative update. The sampler draws the next round's batches from p
(resampling; no loss weights). The paper's "Regroup" step (re-partitioning the data by clusters of
a sentence-embedding model) is preprocessing and out of scope here. Project choices:

- ``lam`` (λ) = 5 by default: u = G p / ‖G p‖ is a unit vector, its entries of order 1/√K, so λ = 1
  would leave p within a factor of about 2 of uniform at K = 8 whatever the gradients say; λ = 5 lets
  a domain whose gradient aligns with nothing (u_k = 0) fall by about e^{-5/√K} (≈ 0.17 at K = 8)
  against one aligned with the rest, and a domain that opposes the rest (negative Gram entries)
  further.
- Presence: a domain absent from the whole round has NaN row and column in G (the trainer's mark);
  the update runs on the present domains P alone, u = G_PP p_P / ‖G_PP p_P‖ with the current p
  restricted to P, and p_P ← (the mass of P before) · softmax(λ u), so an absent domain keeps its
  weight. Any other non-finite entry of G_PP, a non-finite loss of a domain in the last step's
  batch, a non-finite learning rate, or ‖G_PP p_P‖ = 0 skips the update and changes nothing.
- The update uses the learned p, before ``floor`` (which mixes the output with uniform and never
  enters the state).
- The first update is at step ``round_steps - 1``, after one round on the initial (uniform) mixture;
  ``observe`` on the round's other steps changes nothing (their requests only accumulate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import Request, register
from .common import LearnedMixture, check_knob, is_number, present_domains, require, softmax

PARAMS = ("final", "all")


@dataclass
class RnbConfig:
    name: str = "rnb"
    """Registry name."""
    round_steps: int = 10
    """Steps per round: gradients are summed over a round and p is rewritten on its last step."""
    lam: float = 5.0
    """λ, the temperature of p = softmax(λ G p / ‖G p‖). u is a unit vector (entries ~1/√K), so λ
    sets how far from uniform p can move: λ = 1 stays within a factor ~2 at K = 8."""
    params: str = "final"
    """Which parameters the per-domain gradients cover: "final" (the model's last block, the paper's
    cheap final-layer gradients) or "all"."""
    floor: float = 0.0
    """Mix the output with uniform: w ← (1 - floor) p + floor/K (not fed back into p)."""

    def validate(self) -> None:
        check_knob(
            isinstance(self.round_steps, int) and not isinstance(self.round_steps, bool) and self.round_steps >= 1,
            "round_steps",
            self.round_steps,
            "must be an integer >= 1",
        )
        check_knob(is_number(self.lam) and self.lam > 0, "lam", self.lam, "must be a number > 0")
        check_knob(self.params in PARAMS, "params", self.params, f"must be one of {list(PARAMS)}")
        check_knob(is_number(self.floor) and 0 <= self.floor <= 1, "floor", self.floor, "must be in [0, 1]")


@register
class RnB(LearnedMixture):
    name = "rnb"
    Config = RnbConfig

    def __init__(self, domains, cfg: RnbConfig, **context):
        super().__init__(domains, cfg, **context, floor=cfg.floor)
        self._p = np.full(self.K, 1.0 / self.K)
        self._publish()

    def _learned(self) -> np.ndarray:
        return self._p.copy()

    def ends_round(self, step: int) -> bool:
        """Whether step ``step`` is the last of a round (the update step)."""
        return (step + 1) % self.cfg.round_steps == 0

    @property
    def accumulates(self) -> bool:
        return self.cfg.round_steps > 1

    def request(self, step: int) -> Request:
        return Request(gram=True, params=self.cfg.params, source="in_batch", accumulate=not self.ends_round(step))

    def observe(self, stats) -> None:
        if not self.ends_round(stats.step):
            return
        (G,) = require(stats, self.name, "gram")
        if G.shape != (self.K, self.K):
            raise ValueError(f"{self.name}: step {stats.step} has a DomainStats.gram of shape {G.shape}, not K x K")
        if present_domains(stats, []) is None:  # the learning rate, the losses of the batch's domains
            return
        marked = np.isnan(G)
        present = ~(marked.all(axis=1) & marked.all(axis=0))
        if not present.any():
            return
        G_pp = G[np.ix_(present, present)]
        if not np.all(np.isfinite(G_pp)):
            return
        with np.errstate(over="ignore", invalid="ignore"):
            v = G_pp @ self._p[present]
            norm = float(np.linalg.norm(v))
        if not (math.isfinite(norm) and norm > 0):
            return
        p = self._p.copy()
        p[present] = self._p[present].sum() * softmax(self.cfg.lam * (v / norm))
        self._p = p
        self._publish()
        self._record()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "p": self._p.copy()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._p = np.asarray(state["p"], dtype=np.float64).copy()
        self._publish()
