"""Mixture controllers: pure decision logic over per-domain statistics (numpy only)."""

from .base import (REGISTRY, Controller, DomainStats, MixtureConfigError, Request, build_controller,
                   check_weights)
from . import static  # noqa: F401  (registers uniform, static, temperature)

__all__ = ["REGISTRY", "Controller", "DomainStats", "MixtureConfigError", "Request", "build_controller", "check_weights"]
