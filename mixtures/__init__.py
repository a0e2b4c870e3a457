"""Mixture controllers: pure decision logic over per-domain statistics (numpy only)."""

from .base import (REGISTRY, Controller, DomainStats, MixtureConfigError, Request, build_controller,
                   check_weights)
from . import static  # noqa: F401  (registers uniform, static, temperature)
from . import dga, doge, doremi, odm, tikmix  # noqa: F401  (registers dga, doge, doremi, odm, tikmix_d, tikmix_m)

__all__ = ["REGISTRY", "Controller", "DomainStats", "MixtureConfigError", "Request", "build_controller", "check_weights"]
