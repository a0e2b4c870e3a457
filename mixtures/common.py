"""Pieces shared by the online controllers (DoGE, DGA, DoReMi, ODM): log-space simplex steps,
gradient clip factors, the presence and finiteness rules of controllers.md §0, and a base class for
controllers whose learned distribution is either sampled from or turned into loss weights.

Everything works on log-weights so that a domain whose weight underflows in probability space can
still come back, and so that the uniform mixes of DoGE (ε) and DoReMi (c) stay exact in log space.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np

from .base import Controller, DomainStats, MixtureConfigError, apply_floor


def logsumexp(z: np.ndarray) -> float:
    """log Σ exp(z), stable for large entries and for -inf entries (not all of them)."""
    top = np.max(z)
    if top == -np.inf:
        return -math.inf
    return float(top + np.log(np.sum(np.exp(z - top))))


def softmax(z: np.ndarray) -> np.ndarray:
    """exp(z) / Σ exp(z) computed after subtracting the maximum, so large scores do not overflow."""
    e = np.exp(z - np.max(z))
    return e / e.sum()


def safe_log(p: np.ndarray) -> np.ndarray:
    """log p with log 0 = -inf and no warning: a weight that underflowed stays representable."""
    with np.errstate(divide="ignore"):
        return np.log(p)


def mirror_step(logw: np.ndarray, step: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Normalised log-weights after log w_i += step_i for the present domains only.

    The exponentiated step is renormalised *within* the present domains, to the total mass they had
    before: an absent domain keeps its exact (normalised) log-weight instead of losing mass to a
    renormalisation over a step it did not take part in (controllers.md §0). With every domain
    present this is the plain softmax(log w + step) of the papers.
    """
    out = logw.copy()
    mass = logsumexp(logw[present]) if present.any() else -math.inf
    if mass == -math.inf:
        return out
    z = logw[present] + step[present]
    out[present] = z - logsumexp(z) + mass
    return out


def mix_uniform_log(logw: np.ndarray, eps: float) -> np.ndarray:
    """log((1 - eps) w + eps u) for normalised log-weights, without leaving log space."""
    if eps <= 0:
        return logw
    return np.logaddexp(math.log1p(-eps) + logw, math.log(eps / logw.size))


def clip_factors(norms: np.ndarray, max_norm: float) -> np.ndarray:
    """c = min(1, C / ||g||): the factor that clips a gradient of norm ||g|| to norm at most C.

    Written as C / max(||g||, C) so that a zero norm needs no division by zero.
    """
    return max_norm / np.maximum(norms, max_norm)


def present_domains(
    stats: DomainStats, rows: list[np.ndarray], *, probed: bool = False, scalars: tuple[np.ndarray, ...] = ()
) -> np.ndarray | None:
    """Which domains take part in an update, or None when the step must be skipped.

    ``rows`` are the per-domain statistics the controller needs (each [K] or [K, R]); ``scalars``
    are statistics that are not per domain (reference norms). A domain is present when it had
    tokens in the step; with ``probed`` gradients (a separate probe batch for every domain) it is
    present unless the trainer marked its rows entirely NaN. Any other non-finite value of a
    present domain, a non-finite training loss of a domain in the batch, a non-finite scalar or
    learning rate skips the whole step (None), as controllers.md §0 requires.
    """
    in_batch = np.asarray(stats.tokens) > 0
    flat = [np.asarray(r, dtype=np.float64).reshape(in_batch.size, -1) for r in rows]
    if probed:
        present = ~np.all(np.concatenate([np.isnan(r) for r in flat], axis=1), axis=1)
    else:
        present = in_batch
    finite = (
        math.isfinite(stats.lr)
        and np.all(np.isfinite(np.asarray(stats.loss)[in_batch]))
        and all(np.all(np.isfinite(r[present])) for r in flat)
        and all(np.all(np.isfinite(v)) for v in scalars)
    )
    return present if finite else None


def require(stats: DomainStats, controller: str, *fields: str) -> list[np.ndarray]:
    """The named DomainStats fields as float arrays; a missing one is a trainer bug, not a skip."""
    out = []
    for name in fields:
        value = getattr(stats, name)
        if value is None:
            raise ValueError(f"{controller}: step {stats.step} has no DomainStats.{name}, which its Request asked for")
        out.append(np.asarray(value, dtype=np.float64))
    return out


def check_knob(ok: bool, knob: str, value, rule: str) -> None:
    """Raise MixtureConfigError naming ``mixture.<knob>`` unless ``ok``."""
    if not ok:
        raise MixtureConfigError(f"mixture.{knob}={value!r} {rule}")


def is_number(value) -> bool:
    """A finite int or float (bool excluded: YAML's ``true`` is not a step size)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_reference(value, knob: str, *, allow_heldout: bool) -> None:
    """A reference gradient name as Request.align spells it: "target:<name>" (or, with
    ``allow_heldout``, "heldout", "heldout:<domain>" and "heldout:*")."""
    ok = isinstance(value, str) and (
        value.startswith("target:")
        and len(value) > len("target:")
        or allow_heldout
        and (value == "heldout" or value.startswith("heldout:") and len(value) > len("heldout:"))
    )
    rule = (
        'must be "heldout", "heldout:<domain>", "heldout:*" or "target:<name>"'
        if allow_heldout
        else 'must be "target:<name>"'
    )
    check_knob(ok, knob, value, rule)


class LearnedMixture(Controller):
    """A controller whose method learns one distribution α over the domains.

    In ``proxy`` mode the sampler stays uniform and α acts through the loss: ``loss_weights`` =
    K·α. The trainer multiplies every token of domain i by loss_weights[i] and divides by the step's
    total token count N, so the objective is Σ_i K α_i (n_i/N) L_i with n_i domain i's tokens; when
    the uniform sampler gives every domain n_i = N/K this is exactly Σ_i α_i L_i, the update
    direction Σ_i α_i g_i of DoGE and DoReMi's proxy objective. In ``resample`` mode the sampler
    draws from α and the loss is unweighted.

    ``floor`` mixes the *output* with uniform; it never feeds back into the method's state, so it
    does not compound. The running average (what a proxy search exports) is over α, not over the
    sampler's weights, and leaves out the first ``burn_in`` recorded steps.
    """

    def __init__(self, domains, cfg, *, proxy: bool = False, floor: float = 0.0, burn_in: int = 0, **context):
        super().__init__(domains, cfg, **context)
        self._proxy = proxy
        self._floor = floor
        self._burn_in = burn_in
        self._records = 0

    @abstractmethod
    def _learned(self) -> np.ndarray:
        """The method's current distribution over the domains (before the floor)."""

    @property
    def mixture(self) -> np.ndarray:
        """α with the floor applied: what the sampler (resample) or the loss (proxy) uses."""
        return np.array(apply_floor(self._learned(), self._floor))

    def _publish(self) -> None:
        """Refresh the sampler weights after the state changed."""
        self._weights = np.full(self.K, 1.0 / self.K) if self._proxy else self.mixture

    @property
    def loss_weights(self) -> np.ndarray:
        return self.K * self.mixture if self._proxy else np.ones(self.K)

    def _record(self) -> None:
        self._records += 1
        if self._records > self._burn_in:
            self._sum += self.mixture
            self._count += 1

    @property
    def average_weights(self) -> np.ndarray:
        return self._sum / self._count if self._count else self.mixture

    def state_dict(self) -> dict:
        return {**super().state_dict(), "records": self._records}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._records = int(state["records"])


class ExponentiatedMixture(LearnedMixture):
    """A LearnedMixture updated by exponentiated steps on its log-weights (DoGE, DoReMi).

    The state is log α, normalised; each update is ``mirror_step`` followed by the method's own
    uniform mix (DoGE's ε, DoReMi's c), which, as in both official codes, is part of the state.
    """

    def __init__(self, domains, cfg, **kwargs):
        super().__init__(domains, cfg, **kwargs)
        self._logw = np.full(self.K, -math.log(self.K))
        self._publish()

    def _learned(self) -> np.ndarray:
        return np.exp(self._logw)

    def _update(self, step: np.ndarray, present: np.ndarray, eps: float) -> None:
        """log α += step on the present domains, renormalise, mix with uniform by ``eps``."""
        self._logw = mix_uniform_log(mirror_step(self._logw, step, present), eps)
        self._publish()
        self._record()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "logw": self._logw.copy()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._logw = np.asarray(state["logw"], dtype=np.float64).copy()
        self._publish()
