"""Fixed mixtures: uniform, static (explicit weights) and temperature sampling (controllers.md §7)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Controller, DomainStats, MixtureConfigError, apply_floor, check_weights, register


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
