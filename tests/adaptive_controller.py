"""A small adaptive controller for loop tests: weights ∝ exp(mean loss / tau), updated every step.

It exercises everything an online controller needs from the loop (weights that move, state that
must survive a restart, the shard-boundary rule) without depending on the gradient probe.
"""

from dataclasses import dataclass

import numpy as np

from mixtures.base import REGISTRY, Controller, register


@dataclass
class LossSoftmaxConfig:
    name: str = "test_loss_softmax"
    tau: float = 0.5


class LossSoftmax(Controller):
    name = "test_loss_softmax"
    Config = LossSoftmaxConfig

    def __init__(self, domains, cfg, **context):
        super().__init__(domains, cfg, **context)
        self.ema = np.zeros(self.K)
        self.updates = 0

    def observe(self, stats):
        present = stats.tokens > 0
        self.ema[present] = 0.7 * self.ema[present] + 0.3 * stats.loss[present]
        z = self.ema / self.cfg.tau
        w = np.exp(z - z.max())
        self._weights = w / w.sum()
        self.updates += 1

    def state_dict(self):
        return {**super().state_dict(), "ema": self.ema.copy(), "updates": self.updates}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ema = np.asarray(state["ema"]).copy()
        self.updates = int(state["updates"])


if LossSoftmax.name not in REGISTRY:
    register(LossSoftmax)
