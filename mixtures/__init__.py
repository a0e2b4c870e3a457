"""Mixture controllers: pure decision logic over per-domain statistics (numpy only)."""

from . import (  # noqa: F401  (registers dga, doge, doremi, odm, pike, rnb, tikmix_d, tikmix_m)
    dga,
    doge,
    doremi,
    odm,
    pike,
    rnb,
    static,  # noqa: F401  (registers uniform, static, temperature)
    tikmix,
)
from .base import REGISTRY, Controller, DomainStats, MixtureConfigError, Request, build_controller, check_weights

__all__ = [
    "REGISTRY",
    "Controller",
    "DomainStats",
    "MixtureConfigError",
    "Request",
    "build_controller",
    "check_weights",
]
