"""DGA: dynamic gradient alignment with a few examples of a target set (controllers.md §2).

Source: Fan, Grangier, Ablin, arXiv 2410.02498. No official code is public; the update follows the
same first author's multi-target-data-mixing (3b0c25c, ``MAPTrainer.domain_reweight_step``), and
the EMA and the distribution-reweighting mode follow controllers.md's reconstruction. On the update
steps (every ``update_every`` steps), with g_T the gradient on ``target_sequences`` sequences of
the target set and g_i that of domain i:

    a_i = c_i c_T <g_i, g_T>,   c = min(1, C/||g||)   (per-domain clip, no other normalisation)
    α̂ ∝ α exp(η_α a),  η_α = η_t/μ (``lr_coupling``) or 1/μ
    α ← β α + (1 - β) α̂                                 (EMA stabiliser)

The model trains on batches drawn from α (resampling; no loss weights).

Distribution reweighting (§2.3) is the ``basis`` knob of this same controller: w ∈ Δ^p over the
rows P_j of a p×K matrix, α = Pᵀw, and the mirror step + EMA act on w with
a_{P_j} = <g_{P_j}, g_T>. Since g_{P_j} = Σ_i P_ji g_i for per-domain mean-loss gradients g_i,
a_{P_j} = Σ_i P_ji a_i comes from the per-domain alignments the trainer already measures. Without
``basis`` P is the identity and this is plain DGA. Choices of the project:

- Clipping happens per domain before combining: a_{P_j} is the alignment of Σ_i P_ji (c_i g_i) with
  c_T g_T. Its bound |a_{P_j}| ≤ C ||c_T g_T|| is the same as clipping g_{P_j} itself, which would
  need the K×K Gram to know ||g_{P_j}||. A domain with an exploding gradient is damped alone
  instead of damping its whole basis distribution.
- A domain absent from an update (in_batch source, or NaN rows from the trainer) is left out of
  each basis distribution, renormalised over its present domains; a basis with no present domain,
  or (P = I) the absent domain itself, keeps its weight (``mirror_step``).
- The first update is at step ``update_every - 1``, after ``update_every`` steps on the initial
  (uniform) mixture, like the peer code's ``(global_step + 1) % reweight_train_iters == 0``.
- ``floor`` mixes the output with uniform and never enters the EMA state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import MixtureConfigError, Request, check_weights, register
from .common import (
    LearnedMixture,
    check_knob,
    check_reference,
    clip_factors,
    is_number,
    mirror_step,
    present_domains,
    require,
    safe_log,
)

SOURCES = ("auto", "probe_batch", "in_batch")


@dataclass
class DgaConfig:
    name: str = "dga"
    """Registry name."""
    target: str | None = None
    """The specific set whose gradient the mixture aligns with: "target:<name>". Required."""
    update_every: int = 10
    """T_r: the weights are updated on every T_r-th step (the peer code's ``reweight_train_iters``)."""
    mu: float = 0.001
    """μ in the step size η_α = η_t/μ (or 1/μ without ``lr_coupling``); the peer code's ``mu_train``."""
    lr_coupling: bool = True
    """Scale the step by the model learning rate η_t (weights then freeze as the LR decays)."""
    max_grad_norm: float = 1.0
    """C, the per-domain clip applied to every g_i and to g_T before the inner products."""
    ema: float = 0.9
    """β, weight of the previous α in α ← β α + (1 - β) α̂; 0 turns the EMA off."""
    floor: float = 0.0
    """Mix the output with uniform: w ← (1 - floor) α + floor/K (not fed back into α)."""
    source: str = "auto"
    """Where the g_i come from: "auto" (the training batch when it holds every domain, else a probe
    batch), "probe_batch" (always a separate batch of ``probe_sequences`` sequences per domain, as
    the peer code's per-domain loaders: a domain at weight ~0 still gets a signal) or "in_batch"
    (always the training batch; an absent domain is skipped). "auto" costs a probe batch only when
    the sampler left a domain out; the training batch's per-domain gradients are the same
    estimator on fewer sequences (B/K per domain instead of ``probe_sequences``)."""
    probe_sequences: int = 16
    """Sequences per domain in a probe batch."""
    target_sequences: int = 16
    """Sequences of the target set behind g_T."""
    basis: list | dict | None = None
    """Distribution-reweighting mode: p basis distributions over the domains, as a list of p
    per-domain weight lists (domain order) or a map name -> {domain: weight}; rows are normalised.
    Null: one basis per domain (plain DGA)."""

    def validate(self) -> None:
        check_reference(self.target, "target", allow_heldout=False)
        check_knob(
            isinstance(self.update_every, int) and self.update_every >= 1,
            "update_every",
            self.update_every,
            "must be an integer >= 1",
        )
        check_knob(is_number(self.mu) and self.mu > 0, "mu", self.mu, "must be > 0")
        check_knob(isinstance(self.lr_coupling, bool), "lr_coupling", self.lr_coupling, "must be true or false")
        check_knob(
            is_number(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "must be > 0"
        )
        check_knob(is_number(self.ema) and 0 <= self.ema < 1, "ema", self.ema, "must be in [0, 1)")
        check_knob(is_number(self.floor) and 0 <= self.floor <= 1, "floor", self.floor, "must be in [0, 1]")
        check_knob(self.source in SOURCES, "source", self.source, f"must be one of {list(SOURCES)}")
        for knob in ("probe_sequences", "target_sequences"):
            value = getattr(self, knob)
            check_knob(isinstance(value, int) and value > 0, knob, value, "must be a positive integer")
        check_knob(
            self.basis is None or isinstance(self.basis, (list, dict)) and len(self.basis) > 0,
            "basis",
            self.basis,
            "must be a non-empty list of per-domain weight lists or a map name -> {domain: weight}",
        )


def basis_matrix(basis, domains: list[str]) -> np.ndarray:
    """The p×K matrix of the ``basis`` knob, rows normalised; the identity when it is null."""
    if basis is None:
        return np.eye(len(domains))
    if isinstance(basis, dict):
        rows = [check_weights(w, domains, f"mixture.basis.{name}") for name, w in basis.items()]
    else:
        rows = [check_weights(w, domains, f"mixture.basis[{j}]") for j, w in enumerate(basis)]
    return np.stack(rows)


@register
class DGA(LearnedMixture):
    name = "dga"
    Config = DgaConfig

    def __init__(self, domains, cfg: DgaConfig, **context):
        super().__init__(domains, cfg, **context, floor=cfg.floor)
        self.basis = basis_matrix(cfg.basis, self.domains)
        if cfg.basis is not None and np.any(self.basis.sum(axis=0) == 0):
            unused = [d for d, m in zip(self.domains, self.basis.sum(axis=0)) if m == 0]
            raise MixtureConfigError(
                f"mixture.basis gives no weight to domains {unused} in any distribution; they could never be sampled"
            )
        self._w = np.full(len(self.basis), 1.0 / len(self.basis))
        self._publish()

    def _learned(self) -> np.ndarray:
        return self._w @ self.basis

    def updates_at(self, step: int) -> bool:
        """Whether step ``step`` is an update step (the last of every block of ``update_every``)."""
        return (step + 1) % self.cfg.update_every == 0

    @property
    def references(self) -> tuple[str, ...]:
        return (self.cfg.target,)

    def request(self, step: int) -> Request:
        if not self.updates_at(step):
            return Request()
        cfg = self.cfg
        return Request(
            align=(cfg.target,),
            norms=True,
            source=cfg.source,
            probe_sequences=cfg.probe_sequences,
            ref_sequences=cfg.target_sequences,
        )

    def basis_alignment(self, a: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a_{P_j}, which bases are present): each basis restricted to the present domains.

        ``a`` holds the clipped per-domain alignments, 0 for absent domains.
        """
        restricted = self.basis * present
        mass = restricted.sum(axis=1)
        has = mass > 0
        a_basis = np.zeros(len(self.basis))
        a_basis[has] = restricted[has] @ a / mass[has]
        return a_basis, has

    def observe(self, stats) -> None:
        if not self.updates_at(stats.step):
            return
        align, norms, ref_norms = require(stats, self.name, "align", "norms", "ref_norms")
        present = present_domains(
            stats, [align[:, 0], norms], probed=self.cfg.source != "in_batch", scalars=(ref_norms[0],)
        )
        if present is None or not present.any():
            return
        clip = self.cfg.max_grad_norm
        a = np.where(present, clip_factors(norms, clip) * clip_factors(ref_norms[0], clip) * align[:, 0], 0.0)
        a_basis, has = self.basis_alignment(a, present)
        eta = (stats.lr if self.cfg.lr_coupling else 1.0) / self.cfg.mu
        w_hat = np.exp(mirror_step(safe_log(self._w), eta * a_basis, has))
        self._w = self.cfg.ema * self._w + (1 - self.cfg.ema) * w_hat
        self._publish()
        self._record()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "w": self._w.copy()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._w = np.asarray(state["w"], dtype=np.float64).copy()
        self._publish()
