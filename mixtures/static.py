"""Fixed mixtures: uniform, static (explicit weights), temperature sampling (controllers.md §7) and UniMax (§8.7)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .base import Controller, DomainStats, MixtureConfigError, apply_floor, check_weights, register
from .common import check_knob, is_number


class _Fixed(Controller):
    """Weights set once at construction; ``observe`` only feeds the running average."""

    @property
    def adaptive(self) -> bool:
        return False

    def observe(self, stats: DomainStats) -> None:
        pass


@dataclass
class UniformConfig:
    name: str = "uniform"
    """Registry name."""


@register
class Uniform(_Fixed):
    name = "uniform"
    Config = UniformConfig


@dataclass
class StaticConfig:
    name: str = "static"
    """Registry name."""
    weights: dict | list | None = None
    """Weights per domain: a name -> weight map or a list in domain order (normalised; 0 allowed)."""
    weights_from: str | None = None
    """A previous run directory or a weights file (mixtrain/DoReMi JSON, RegMix YAML); the trainer
    reads it into ``weights``. Mutually exclusive with ``weights``."""
    floor: float = 0.0
    """Mix with uniform: w <- (1 - floor) w + floor / K."""

    def validate(self) -> None:
        if self.weights is None and self.weights_from is None:
            raise MixtureConfigError("mixture=static needs mixture.weights or mixture.weights_from")
        if not 0.0 <= self.floor <= 1.0:
            raise MixtureConfigError(f"mixture.floor={self.floor} must be in [0, 1]")


@register
class Static(_Fixed):
    name = "static"
    Config = StaticConfig

    def __init__(self, domains, cfg, **context):
        super().__init__(domains, cfg, **context)
        if cfg.weights is None:
            raise MixtureConfigError(f"mixture.weights_from={cfg.weights_from!r} was not resolved to weights")
        self._weights = apply_floor(check_weights(cfg.weights, self.domains, "mixture.weights"), cfg.floor)


@dataclass
class TemperatureConfig:
    name: str = "temperature"
    """Registry name."""
    temperature: float = 1.0
    """T in w_i ∝ n_i^(1/T), n_i = training tokens of domain i. T=1: natural proportions; T→∞: uniform."""

    def validate(self) -> None:
        if not self.temperature > 0:
            raise MixtureConfigError(f"mixture.temperature={self.temperature} must be > 0")


@register
class Temperature(_Fixed):
    name = "temperature"
    Config = TemperatureConfig

    def __init__(self, domains, cfg, **context):
        super().__init__(domains, cfg, **context)
        if self.domain_tokens is None:
            raise MixtureConfigError("mixture=temperature needs the domains' token counts")
        sizes = self.domain_tokens
        if np.any(sizes <= 0):
            raise MixtureConfigError("mixture=temperature: every domain needs a positive token count")
        # In log space: n^(1/T) overflows for small T and 10^7-token domains.
        logw = np.log(sizes) / cfg.temperature
        w = np.exp(logw - logw.max())
        self._weights = w / w.sum()


@dataclass
class UnimaxConfig:
    name: str = "unimax"
    """Registry name."""
    epochs: float = 1.0
    """N, the most passes over any one domain's training tokens the budget may ask for (fractions allowed).
    Default 1 (no domain repeated), our reading of the paper's default; Chung et al. 2023 also try larger
    caps, and controllers.md §8.7 names no value, so check their max-epoch ablation before leaning on it.
    A larger N lets small domains take more of the budget by repeating."""
    budget_tokens: int | None = None
    """B, the training tokens the mixture is planned for. null: this run's own budget (steps x global
    batch x seq_len). Set it to plan for another run, e.g. the main run's budget while training a proxy."""

    def validate(self) -> None:
        check_knob(is_number(self.epochs) and self.epochs > 0, "epochs", self.epochs, "must be > 0 and finite")
        check_knob(
            self.budget_tokens is None or is_number(self.budget_tokens) and self.budget_tokens > 0,
            "budget_tokens",
            self.budget_tokens,
            "must be a token count > 0 and finite (or null for the run's own)",
        )


def unimax_allocation(sizes: np.ndarray, budget: float, epochs: float) -> np.ndarray:
    """Tokens of ``budget`` given to each domain: an equal share of what is left, capped at
    ``epochs`` x the domain's size, taking domains from the smallest up (Chung et al. 2023, Alg. 1).
    When the budget exceeds every cap together, each domain gets just its cap and the sum is below
    ``budget``."""
    caps = epochs * np.asarray(sizes, dtype=np.float64)
    alloc = np.zeros_like(caps)
    left = float(budget)
    # Smallest first: a small domain's unused share then goes to the larger ones, which can still take it.
    order = np.argsort(caps, kind="stable")
    for done, i in enumerate(order):
        alloc[i] = min(left / (caps.size - done), caps[i])
        left -= alloc[i]
    return alloc


@register
class Unimax(_Fixed):
    """UniMax (Chung et al., ICLR 2023): uniform over domains up to N epochs of each, the rest to the
    domains still under their cap; w_i = tokens allocated to i / B. With B below K x the smallest cap
    it is uniform. When B exceeds N x all the data (every domain capped) there is no budget-respecting
    answer: the weights are the caps normalised, i.e. the natural proportions (every domain then sees
    the same B / total epochs, more than N), and a RuntimeWarning says so.

    ``budget`` is B and ``allocation`` the tokens of B planned for each domain (domain order)."""

    name = "unimax"
    Config = UnimaxConfig

    def __init__(self, domains, cfg, **context):
        super().__init__(domains, cfg, **context)
        if self.domain_tokens is None:
            raise MixtureConfigError("mixture=unimax needs the domains' token counts (none were given)")
        sizes = self.domain_tokens
        if sizes.shape != (self.K,):
            raise MixtureConfigError(
                f"mixture=unimax got {sizes.size} token counts for {self.K} domains {self.domains}"
            )
        if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
            raise MixtureConfigError(f"mixture=unimax: every domain needs a positive token count, got {sizes.tolist()}")
        budget = cfg.budget_tokens if cfg.budget_tokens is not None else self.run_tokens
        if budget is None:
            raise MixtureConfigError(
                "mixture=unimax needs a token budget: set mixture.budget_tokens (no run budget is known here)"
            )
        self.budget = float(budget)
        self.allocation = unimax_allocation(sizes, self.budget, cfg.epochs)
        total = self.allocation.sum()
        # Below the budget only when every domain is capped; the relative shares are still the caps.
        if total < self.budget * (1 - 1e-9):
            warnings.warn(
                f"mixture=unimax: the budget of {self.budget:.0f} tokens exceeds "
                f"mixture.epochs={cfg.epochs} x "
                f"all {sizes.sum():.0f} training tokens; every domain is capped, so the weights are the "
                f"natural proportions (each domain sees {self.budget / sizes.sum():.3g} epochs)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._weights = self.allocation / total
