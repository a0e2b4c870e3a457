"""The hook seam: optional features plug into the loop here, not as branches in it.

The loop calls, on every callback in order (``Loop.callbacks``):

- ``score_fn()`` when planning a shard: a callback that scores candidate samples (the online
  curriculum) returns its scoring function; the first one given is used;
- ``on_shard(loop, plan, record)`` once a shard is planned (``record``: its weights.jsonl row);
- ``on_step(loop, record, stats)`` after the optimizer step, before the step's record is logged
  (a callback may add keys to it);
- ``on_eval(loop, results)`` after an evaluation (``results["step"]`` is the step it measured);
- ``on_step_end(loop)`` when the step is over (its evaluation and checkpoint included);
- ``on_save(loop, directory)`` inside a checkpoint save, on every rank, once that rank's files are
  written and before the rename that completes it;
- ``on_end(loop, result)`` after the final evaluation and checkpoint, when the run's files are written.

A callback with ``state_dict``/``load_state_dict`` and a ``name`` joins the checkpoint's stateful
map under that name, so it resumes with the run. A feature registers a factory with
:func:`register` (``factory(loop) -> Callback | None``, called once the engine is built, before a
resume); the loop builds every registered one and appends the tracker last, which logs what the
others added to a step's record.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


class Callback:
    name: str | None = None
    """Its key in the checkpoint's stateful map (None: nothing to save)."""

    def score_fn(self):
        return None

    def on_shard(self, loop, plan, record: dict) -> None:
        pass

    def on_step(self, loop, record: dict, stats) -> None:
        pass

    def on_eval(self, loop, results: dict) -> None:
        pass

    def on_step_end(self, loop) -> None:
        pass

    def on_save(self, loop, directory: Path) -> None:
        pass

    def on_end(self, loop, result) -> None:
        pass


FACTORIES: list[Callable] = []
"""Registered callback factories, in registration order."""


def register(factory: Callable) -> Callable:
    FACTORIES.append(factory)
    return factory


def stateful(callbacks: list[Callback]) -> dict:
    """The callbacks that join the checkpoint, by name."""
    return {cb.name: cb for cb in callbacks if cb.name is not None and hasattr(cb, "state_dict")}


class FaultInjection(Callback):
    """train.fail_at_step's crash: after that step (its checkpoint included) or, with
    train.fail_in_checkpoint, inside that step's checkpoint save before its rename. Fires once per
    job: a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) runs clean."""

    def __init__(self, train_cfg, rank: int):
        self.t, self.rank = train_cfg, rank

    def _armed(self, step: int, in_checkpoint: bool) -> bool:
        t = self.t
        return (
            bool(t.fail_at_step)
            and step == t.fail_at_step
            and t.fail_in_checkpoint == in_checkpoint
            and t.fail_rank in (-1, self.rank)
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0
        )

    def on_step_end(self, loop) -> None:
        if self._armed(loop.step, in_checkpoint=False):
            self._kill(f"after step {loop.step}")

    def on_save(self, loop, directory: Path) -> None:
        if self._armed(loop.step, in_checkpoint=True):
            held = ", ".join(sorted(p.name for p in directory.iterdir()))
            self._kill(f"while writing {directory} (holding {held})")

    def _kill(self, where: str) -> None:
        print(f"[mixtrain] fault injection: killing rank {self.rank} {where}", flush=True)
        sys.stderr.flush()
        if self.t.fail_rank == -1:
            os._exit(17)  # every rank: no cleanup, like a killed job
        os.kill(os.getpid(), signal.SIGKILL)  # one rank, really killed: the others learn it from torchrun


@register
def _fault_injection(loop) -> Callback | None:
    t = loop.cfg.train
    return FaultInjection(t, loop.rank) if t.fail_at_step else None
