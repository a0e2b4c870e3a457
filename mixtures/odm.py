"""ODM: online data mixing as an EXP3 multi-armed bandit over domains (controllers.md §6).

Source: Albalak, Pan, Raffel, Wang, arXiv 2312.02406 (NeurIPS 2023 R0-FoMo workshop); code
github.com/alon-albalak/online-data-mixing edbfdad (``megatron/data/data_sampling_utils.py``). Each
domain is an arm and its training loss is the reward. For round t = 1, 2, ...

    ε_t = min{1/K, sqrt(ln K / (K t))}
    π_t(i) = (1 - K ε_t) · softmax(ε_{t-1} R̂)_i + ε_t

Project choices (controllers.md §6.3, all [reconstructed]):
- Mixed batches (mixtrain's layout): every domain present in the step is rewarded with the
  importance-weighted estimate r̂_i = K · (n_i / (S π_i)) · L_i, n_i/S its share of the step's
  sequences (= its token share: sequences have equal length), and R̂_i ← γ R̂_i + (1 - γ) r̂_i.
  The factor K matches the paper's L/π magnitude at π ≈ 1/K. Absent domains keep R̂_i.
- π_i in the estimate is the distribution the step's batch was actually drawn from
  (``DomainStats.sample_weights``: the trainer applies a policy from the next shard boundary, so
  with several steps per shard it is an earlier policy than the latest one); without it, the
  policy this controller last published.
- ε_0 = 1/K. It only multiplies R̂ in π_1, whose softmax term has weight 1 - K ε_1 = 0 for K ≥ 2:
  the first policy is uniform. Round t advances once per applied update; ε is a function of t.
- ``warmup_steps`` (default 0): steps before it leave the uniform policy untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import Controller, register
from .common import check_knob, is_number, present_domains, softmax


@dataclass
class OdmConfig:
    name: str = "odm"
    """Registry name."""
    gamma: float = 0.9
    """γ, the smoothing of the reward estimate: R̂ ← γ R̂ + (1 - γ) r̂ (the code's smoothing 0.9)."""
    warmup_steps: int = 0
    """Steps sampled uniformly before the bandit starts learning."""

    def validate(self) -> None:
        check_knob(is_number(self.gamma) and 0 <= self.gamma < 1, "gamma", self.gamma, "must be in [0, 1)")
        check_knob(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "warmup_steps",
            self.warmup_steps,
            "must be an integer >= 0",
        )


def exploration(t: int, k: int) -> float:
    """ε_t = min{1/K, sqrt(ln K / (K t))}, with ε_0 = 1/K."""
    if t == 0:
        return 1.0 / k
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


@register
class ODM(Controller):
    name = "odm"
    Config = OdmConfig

    def __init__(self, domains, cfg: OdmConfig, **context):
        super().__init__(domains, cfg, **context)
        self._reward = np.zeros(self.K)
        self._round = 1
        self._weights = self.policy()

    def policy(self) -> np.ndarray:
        """π_t for the current round t from R̂."""
        eps, eps_prev = exploration(self._round, self.K), exploration(self._round - 1, self.K)
        return (1 - self.K * eps) * softmax(eps_prev * self._reward) + eps

    def observe(self, stats) -> None:
        if stats.step < self.cfg.warmup_steps:
            return
        present = present_domains(stats, [])
        if present is None or not present.any():
            return
        tokens = np.asarray(stats.tokens, dtype=np.float64)
        share = tokens[present] / tokens.sum()
        drawn = self._weights if stats.sample_weights is None else np.asarray(stats.sample_weights, dtype=np.float64)
        estimate = self.K * share / drawn[present] * np.asarray(stats.loss, dtype=np.float64)[present]
        gamma = self.cfg.gamma
        self._reward[present] = gamma * self._reward[present] + (1 - gamma) * estimate
        self._round += 1
        self._weights = self.policy()
        self._record()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reward": self._reward.copy(), "round": self._round}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._reward = np.asarray(state["reward"], dtype=np.float64).copy()
        self._round = int(state["round"])
