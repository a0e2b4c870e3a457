"""DoReMi: Group DRO over domains against a reference model (controllers.md §5).

Source: Xie et al., arXiv 2305.10429 (NeurIPS 2023); code github.com/sangmichaelxie/doremi 7cde52d
(``doremi/trainer.py``). Every step, with λ_i the per-token-clipped excess loss of domain i over the
reference model (the trainer measures it on the same batch):

    α' = α ⊙ exp(η λ);   α = (1 - c) α'/Σα' + c u

The proxy trains on Σ_i α_i L_i under uniform sampling; the export is the time average ᾱ. As in
the official code (``DoReMiTrainer.write_weights`` with the running average seeded by the initial
weights and a count of 1) ᾱ = (α₀ + α₁ + … + α_T)/(T + 1); the paper writes (1/T) Σ_{t=1}^T α_t,
which ``average_initial=false`` gives. A step skipped for non-finite statistics is no update: it
enters neither α nor the average's count.

Project choices (controllers.md §5.6):
- ``reference`` names a previous mixtrain run directory; the trainer loads its final checkpoint as the
  reference model. This controller only carries the string.
- Proxy mode (default): uniform sampling with loss weights α_i/p_i = K·α_i (see ``ExponentiatedMixture``);
  resample mode: the sampler draws from α.
- A domain absent from the step: its λ does not enter and the exponentiated step is renormalised
  among the present domains only, so before smoothing the absent domain's weight is exactly what it
  was. The smoothing with c then applies to every domain, as it is what keeps each weight ≥ c/K.
  The official code instead scores an absent domain with its stored per-domain λ
  (``perdomain_scores``): the last λ it had, or, before the domain was first seen, the initial state
  log(vocabulary size), a large excess loss that pushes an unseen domain *up*. mixtrain's batches
  hold every domain under uniform proxy sampling, so the difference only shows with tiny batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Request, register
from .common import ExponentiatedMixture, check_knob, is_number, present_domains, require


@dataclass
class DoremiConfig:
    name: str = "doremi"
    """Registry name."""
    reference: str | None = None
    """Run directory of a previous mixtrain run (trained on the natural token shares) whose final
    checkpoint is the reference model. Required."""
    reweight_eta: float = 1.0
    """η, the step size of the exponentiated update (the paper's value). Issue #5 of the official
    repository: lower it (e.g. 0.1) if the weights collapse onto one domain."""
    reweight_eps: float = 1e-3
    """c, the smoothing with uniform after each step (the run scripts' value): every weight ≥ c/K."""
    mode: str = "proxy"
    """"proxy": uniform sampling, loss weights K·α_i (the paper's proxy run); "resample": the sampler
    draws from α and the loss is unweighted."""
    average_initial: bool = True
    """Whether the exported ᾱ counts the initial weights α₀ once (the official code's running
    average); false = the paper's (1/T) Σ_{t=1}^T α_t."""

    def validate(self) -> None:
        check_knob(
            isinstance(self.reference, str) and self.reference.strip() != "",
            "reference",
            self.reference,
            "must name the run directory of the reference model",
        )
        check_knob(
            is_number(self.reweight_eta) and self.reweight_eta > 0, "reweight_eta", self.reweight_eta, "must be > 0"
        )
        check_knob(
            is_number(self.reweight_eps) and 0 <= self.reweight_eps < 1,
            "reweight_eps",
            self.reweight_eps,
            "must be in [0, 1)",
        )
        check_knob(self.mode in ("proxy", "resample"), "mode", self.mode, 'must be "proxy" or "resample"')
        check_knob(
            isinstance(self.average_initial, bool), "average_initial", self.average_initial, "must be true or false"
        )


@register
class DoReMi(ExponentiatedMixture):
    name = "doremi"
    Config = DoremiConfig

    @property
    def reference_model(self) -> str:
        return self.cfg.reference

    def __init__(self, domains, cfg: DoremiConfig, **context):
        super().__init__(domains, cfg, **context, proxy=cfg.mode == "proxy")
        if cfg.average_initial:
            self._sum, self._count = self.mixture.copy(), 1

    def request(self, step: int) -> Request:
        return Request(ref_model_loss=True)

    def observe(self, stats) -> None:
        (excess,) = require(stats, self.name, "excess_loss")
        present = present_domains(stats, [excess])
        if present is None or not present.any():
            return
        self._update(self.cfg.reweight_eta * np.where(present, excess, 0.0), present, self.cfg.reweight_eps)
