"""DoGE: domain reweighting with generalization estimation (controllers.md §1).

Source: Fan, Pagliardini, Jaggi, arXiv 2310.15393 (ICML 2024); the update follows the official code
(github.com/Olivia-fsm/DoGE 88400e9, ``DoGETrainer.update_domain_weights_distributed``). Every step:

    c_i = min(1, C/||g_i||), c_T = min(1, C/||g_T||),  S_iT = c_i c_T <g_i, g_T>
    s_i = η_t Σ_T S_iT / (mean_i min(||g_i||, C) + 1e-6),  clipped to [η_t dw_min, η_t dw_max]
    log α += s / μ;  α = softmax(log α);  α = (1 - ε) α + ε u

The official code is written to subtract the self-term S_ii when the target set is the training
set, but that branch never runs (it compares two sets of 0-d tensors, which compare by identity),
and with its shipped held-out ``mix`` target it would not apply anyway. mixtrain's targets are
always separate reference batches ("heldout": a mix of every domain's held-out training slice, the
code's ``mix``; "heldout:*": each evaluated domain's slice as a target of its own, the sum over
targets T being the code's sum over its target domains; "target:<name>": an OOD target set), so no
exclusion is implemented.

Project choices (controllers.md §1.9):
- Lag-1 recombination: the loss weights of step t use α^t and step t's statistics produce α^{t+1}
  (the official code applies α^{t+1} to the same step's gradients, which needs K gradient copies).
- Proxy mode (default): the sampler stays uniform and the update direction Σ_i α_i g_i is realised
  as loss weights K·α_i (see ``ExponentiatedMixture`` for the exact objective); ``average_weights`` is the
  time-averaged α a proxy search exports. Resample mode (not in the paper): the sampler draws from α.
- A domain absent from the step keeps its weight (``mirror_step``) and stays out of the mean-norm
  normaliser. The official code writes a domain's clipped gradient row only when the domain has a
  positive loss and never resets it, so an absent domain is scored with its *stale* row from the
  last step it appeared (the row is zero only before it is first seen), and that row enters the
  normaliser. With the trainer's batches holding every domain (uniform proxy sampling, b ≥ K) the
  two agree.
- ``burn_in`` (default 0 = faithful) leaves the first steps out of the exported average; ``floor``
  (default 0) mixes the output with uniform without entering the state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Request, register
from .common import ExponentiatedMixture, check_knob, check_reference, clip_factors, is_number, present_domains, require

UNIVERSAL_MU, OOD_MU = 0.01, 0.05
UNIVERSAL_CLIP, OOD_CLIP = 5.0, 1.0
NORMALISER_EPS = 1e-6


@dataclass
class DogeConfig:
    name: str = "doge"
    """Registry name."""
    target: str = "heldout"
    """Reference gradient(s) g_T: "heldout" (universal generalization: a mix of every domain's
    held-out training slice, ``data.reference_fraction``, as the official code's ``mix`` holds out
    part of the training data), "heldout:*" (one target per domain that evaluation reports, the
    held-out slice of each, scores summed over them as the official code sums over its target
    domains: generalization to the evaluated domains only), "heldout:<domain>", or "target:<name>"
    (out-of-domain: that target set's few-shot pool)."""
    mu: float | None = None
    """μ, the proximity strength: the log-weight step is s/μ. None picks the official configs' value
    for the target kind: 0.01 universal, 0.05 OOD. Retune when the LR schedule, batch or K change."""
    max_grad_norm: float | None = None
    """C, the per-domain clip applied to every g_i and to g_T before the inner products. None picks
    5.0 universal, 1.0 OOD (official configs)."""
    dw_min: float = 0.0
    """Lower clip of the score s_i, in units of η_t. 0 means a domain never loses weight directly,
    only through renormalisation."""
    dw_max: float = 5.0
    """Upper clip of the score s_i, in units of η_t: caps one step of log α at dw_max·η_t/μ."""
    reweight_eps: float = 0.0
    """ε: α ← (1 - ε) α + ε u after each step; part of the state, as in the official code."""
    mode: str = "proxy"
    """"proxy": uniform sampling, α as loss weights K·α_i (the paper's proxy run); "resample": the
    sampler draws from α and the loss is unweighted."""
    burn_in: int = 0
    """Steps left out of the exported time average ᾱ (0 = average over all steps, as the code)."""
    floor: float = 0.0
    """Mix the output with uniform: w ← (1 - floor) α + floor/K (not fed back into α)."""
    ref_sequences: int | None = None
    """Sequences in the reference batch of g_T. None: controllers.md's b_T = global batch/(K+1), at
    least 4 (the held-out mix as one more "domain" of the batch, as in the official code)."""

    @property
    def ood(self) -> bool:
        """Whether the target is an out-of-domain target set rather than held-out training data."""
        return self.target.startswith("target:")

    @property
    def step_mu(self) -> float:
        """μ in force: the configured one, or the default of the target kind."""
        if self.mu is not None:
            return self.mu
        return OOD_MU if self.ood else UNIVERSAL_MU

    @property
    def clip(self) -> float:
        """C in force: the configured one, or the default of the target kind."""
        if self.max_grad_norm is not None:
            return self.max_grad_norm
        return OOD_CLIP if self.ood else UNIVERSAL_CLIP

    def validate(self) -> None:
        check_reference(self.target, "target", allow_heldout=True)
        check_knob(
            self.mu is None or is_number(self.mu) and self.mu > 0,
            "mu",
            self.mu,
            "must be > 0 (or null for the default)",
        )
        check_knob(
            self.max_grad_norm is None or is_number(self.max_grad_norm) and self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "must be > 0 (or null for the default)",
        )
        check_knob(is_number(self.dw_min), "dw_min", self.dw_min, "must be a finite number")
        check_knob(
            is_number(self.dw_max) and self.dw_max >= self.dw_min,
            "dw_max",
            self.dw_max,
            f"must be a finite number >= mixture.dw_min={self.dw_min}",
        )
        check_knob(
            is_number(self.reweight_eps) and 0 <= self.reweight_eps < 1,
            "reweight_eps",
            self.reweight_eps,
            "must be in [0, 1)",
        )
        check_knob(self.mode in ("proxy", "resample"), "mode", self.mode, 'must be "proxy" or "resample"')
        check_knob(
            isinstance(self.burn_in, int) and self.burn_in >= 0, "burn_in", self.burn_in, "must be an integer >= 0"
        )
        check_knob(is_number(self.floor) and 0 <= self.floor <= 1, "floor", self.floor, "must be in [0, 1]")
        check_knob(
            self.ref_sequences is None or (isinstance(self.ref_sequences, int) and self.ref_sequences > 0),
            "ref_sequences",
            self.ref_sequences,
            "must be a positive integer",
        )


@register
class DoGE(ExponentiatedMixture):
    name = "doge"
    Config = DogeConfig

    def __init__(self, domains, cfg: DogeConfig, **context):
        super().__init__(domains, cfg, **context, proxy=cfg.mode == "proxy", floor=cfg.floor, burn_in=cfg.burn_in)

    def request(self, step: int) -> Request:
        return Request(align=(self.cfg.target,), norms=True, ref_sequences=self.cfg.ref_sequences)

    @property
    def references(self) -> tuple[str, ...]:
        return (self.cfg.target,)

    def scores(
        self, align: np.ndarray, norms: np.ndarray, ref_norms: np.ndarray, lr: float, present: np.ndarray
    ) -> np.ndarray:
        """s_i of the present domains (0 elsewhere): clipped alignment, summed over the targets
        (``align`` [K, T], ``ref_norms`` [T]), over the mean clipped norm."""
        clip = self.cfg.clip
        per_target = (
            clip_factors(norms[present], clip)[:, None] * clip_factors(ref_norms, clip)[None, :] * align[present]
        )
        alignment = per_target.sum(axis=1)
        normaliser = np.minimum(norms[present], clip).mean() + NORMALISER_EPS
        s = np.zeros(self.K)
        s[present] = np.clip(lr * alignment / normaliser, lr * self.cfg.dw_min, lr * self.cfg.dw_max)
        return s

    def observe(self, stats) -> None:
        align, norms, ref_norms = require(stats, self.name, "align", "norms", "ref_norms")
        present = present_domains(stats, [align, norms], scalars=(ref_norms,))
        if present is None or not present.any():
            return
        s = self.scores(align, norms, ref_norms, stats.lr, present)
        self._update(s / self.cfg.step_mu, present, self.cfg.reweight_eps)
