"""The loop's own stateful parts: its counters, and where the sampler stands in the data.

Both go into the checkpoint's stateful map (``"loop"``, ``"sampler"``) beside the controller, the
tracker and the callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data.sampler import DomainSampler, SamplerState, ShardPlan


@dataclass
class TrainState:
    """Optimizer steps taken, non-finite steps in a row, tokens per domain, and one record per shard
    (its weights, counts and sample hash: ``weights.jsonl``'s rows, kept for the run's history)."""

    num_domains: int
    step: int = 0
    nonfinite_in_row: int = 0
    tokens_seen: np.ndarray = field(default=None)  # type: ignore[assignment]
    history: list[dict] = field(default_factory=list)
    lineage: list[dict] = field(default_factory=list)
    """How this run came to be what it is: a warm start (train.init_from), an extension of
    train.steps, an elastic restart on another rank count; one record each, with its step."""

    def __post_init__(self):
        if self.tokens_seen is None:
            self.tokens_seen = np.zeros(self.num_domains)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "nonfinite_in_row": self.nonfinite_in_row,
            "tokens_seen": self.tokens_seen.tolist(),
            "history": self.history,
            "lineage": self.lineage,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.tokens_seen = np.asarray(state["tokens_seen"], dtype=np.float64)
        self.history = list(state["history"])
        self.lineage = list(state.get("lineage", []))  # none before lineage was kept


class ShardCursor:
    """The sampler and the shard in progress. Saved as the sampler state the shard started from and
    its weights (plus, for a scored order, the candidate scores it was planned from); restored by
    re-planning that shard from that state (the same pure function), so a resumed run draws the
    same samples."""

    def __init__(self, sampler: DomainSampler):
        self.sampler = sampler
        self.plan: ShardPlan | None = None
        self.start_state: SamplerState | None = None

    def next_shard(self, weights: np.ndarray, score_fn=None) -> ShardPlan:
        self.start_state = self.sampler.state
        self.plan = self.sampler.plan_shard(weights, score_fn=score_fn)
        self.sampler.advance(self.plan)
        return self.plan

    def state_dict(self) -> dict:
        plan = self.plan
        return {
            "shard_start_state": SamplerState.to_dict(self.start_state if plan is not None else self.sampler.state),
            "shard_weights": None if plan is None else plan.weights.tolist(),
            "shard_recorded": None if plan is None or plan.recorded is None else [np.asarray(r) for r in plan.recorded],
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["shard_start_state"])
        if state["shard_weights"] is None:
            return
        score_fn = None
        if state.get("shard_recorded") is not None:  # an online order replays the scores it planned from
            from .curriculum.pacing import replay

            score_fn = replay(state["shard_recorded"])
        self.next_shard(np.asarray(state["shard_weights"]), score_fn=score_fn)


def upgrade(client: dict) -> dict:
    """A checkpoint from before the stateful map kept the sampler position and tracker offsets
    inside ``"loop"``: split them out under their own names."""
    if "sampler" in client or "loop" not in client:
        return client
    client, loop = dict(client), dict(client["loop"])
    client["sampler"] = {k: loop.pop(k, None) for k in ("shard_start_state", "shard_weights", "shard_recorded")}
    client["tracker"] = loop.pop("tracker")
    client["loop"] = loop
    return client
