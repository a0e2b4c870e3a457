"""Benchmark: what each controller costs a training run, against a static run, side by side.

    python tests/bench/bench_controllers.py [--config small,search] [--steps 40] [--block 10]
                                           [--controllers doge,dga,tikmix_d,odm,doremi,pike,rnb]

Every controller runs a real ``trainer.loop.Loop`` (sampler, engine, probe, reference gradients,
probe batches, reference model, the controller's update, logging: everything a user's run pays
but evaluation and checkpoints, which a static run pays equally) on the demo corpus (8 domains),
one rank. The loops advance in blocks of ``--block`` steps, interleaved: a block of the static
(uniform) run, then a block of one controller, and so on round-robin, so machine noise hits both
sides; a controller's ratio is its total time over the static blocks timed next to it, over a
whole run of ``--steps`` steps (periodic work — DGA every 10 steps, TiKMiX's stage measurement —
is amortised the way a run amortises it). TiKMiX measures once in a run (its default 2 stages), so
a short benchmark run would overstate it: its ratio is also given amortised over a run of
``--run-steps`` steps, from the measured time of its measuring step and of its other steps.
Configurations:

  small   model=small (4 layers, d = 256, GPT-2 vocabulary: 16M parameters), global batch 32 x 128
  search  the main job's proxy search: model=tiny, global batch 8 x 128 (trainer/conf/experiment/search.yaml)

Besides the ratio it prints where the extra time goes (seconds per step): reference gradients,
the probe batch, the probe's reduction and products, the reference model's forward (DoReMi) and the
controller's own update.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer import signals as signals_module  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import Loop  # noqa: E402
from trainer.probe import Probe  # noqa: E402

CONFIGS = {
    "small": {"model": {"n_layer": 4, "n_head": 4, "d_model": 256, "max_seq_len": 512}, "micro_batch": 32},
    "search": {"model": {"n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 256}, "micro_batch": 8},
}
CONTROLLERS = {
    "doge": {"name": "doge"},
    "dga": {"name": "dga", "target": "target:humaneval"},
    "tikmix_d": {"name": "tikmix_d"},
    "odm": {"name": "odm"},
    "doremi": {"name": "doremi"},  # reference: the bench's static run, checkpointed at step 5
    "pike": {"name": "pike"},
    # the training batch only: a domain it misses sits the update out instead of costing a probe batch
    "pike_in_batch": {"name": "pike", "source": "in_batch"},
    "rnb": {"name": "rnb"},
}
PARTS = {
    "reference gradients": (signals_module.Signals, "_reference_gradients"),
    "probe batch": (signals_module.Signals, "_run_probe_batch"),
    "probe reduction": (Probe, "finish"),
}
"""Methods whose time is attributed to a part (wrapped once; the wrapper charges the loop in flight)."""


class Clock:
    """Seconds spent in the wrapped parts by the loop being timed."""

    def __init__(self):
        self.current: str | None = None
        self.parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def wrap(self, name: str, cls, method: str) -> None:
        original = getattr(cls, method)
        clock = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if clock.current is not None:
                    clock.parts[clock.current][name] += time.perf_counter() - t

        setattr(cls, method, timed)


def values(cfg: dict, run: Path, mixture: dict, steps: int) -> dict:
    return {
        "model": cfg["model"],
        "data": {"source": "demo", "seq_len": 128, "steps_per_shard": 10, "eval_sequences": 4},
        "train": {
            "steps": steps,
            "micro_batch": cfg["micro_batch"],
            "lr": 2e-3,
            "min_lr": 2e-4,
            "warmup_steps": 10,
            "eval_every": 0,
            "checkpoint_every": 0,
            "resume": "never",
        },
        "run": {"dir": str(run), "wandb": "disabled", "plots": False, "progress": False},
        "mixture": mixture,
    }


def wrap_controller(loop: Loop, clock: Clock) -> None:
    """Charge the controller's own update (observe) and DoReMi's reference forward to their parts."""
    observe = loop.controller.observe

    def observed(stats):
        t = time.perf_counter()
        observe(stats)
        clock.parts[clock.current]["controller update"] += time.perf_counter() - t

    loop.controller.observe = observed
    if loop.reference is None:
        return
    begin = loop.signals.begin

    def begun(*args, **kwargs):
        m = begin(*args, **kwargs)
        hook = m.on_losses
        if hook is None:
            return m

        def timed(*hook_args):
            t = time.perf_counter()
            hook(*hook_args)
            clock.parts[clock.current]["reference model"] += time.perf_counter() - t

        return dataclasses.replace(m, on_losses=timed)

    loop.signals.begin = begun


def bench(
    config: str, names: list[str], steps: int, block: int, tmp: Path, run_steps: int
) -> list[tuple[str, float, dict]]:
    cfg = CONFIGS[config]
    clock = Clock()
    for part, (cls, method) in PARTS.items():
        clock.wrap(part, cls, method)
    static = Loop(load_config(values(cfg, tmp / "static", {"name": "uniform"}, steps * len(names) + 5)))
    for _ in range(5):
        static.advance()
    static._save()  # a run directory with a checkpoint: DoReMi's reference model (5 steps in, so losses differ)
    loops = {}
    for name in names:
        mixture = dict(CONTROLLERS[name])
        if name == "doremi":
            mixture["reference"] = str(tmp / "static")
        loops[name] = Loop(load_config(values(cfg, tmp / name, mixture, steps)))
        wrap_controller(loops[name], clock)
    totals = {name: [0.0, 0.0] for name in names}  # controller, the static blocks beside it
    measuring = {name: [] for name in names}  # per step of the controller: (seconds, whether it measured)
    for loop in [static, *loops.values()]:  # first steps allocate buffers and warm caches for everyone
        loop.advance()
    done = 1
    while done < steps:
        n = min(block, steps - done)
        for name, loop in loops.items():
            for side, run in ((1, static), (0, loop)):
                clock.current = name if side == 0 else None
                for _ in range(n):
                    req = run.controller.request(run.step) if run.controller.adaptive else None
                    t = time.perf_counter()
                    run.advance()
                    dt = time.perf_counter() - t
                    totals[name][side] += dt
                    if side == 0:
                        measuring[name].append((dt, bool(req and (req.any_gradient or req.ref_model_loss))))
        done += n
        ratios = " ".join(f"{k} {v[0] / v[1]:.3f}" for k, v in totals.items())
        print(f"[{config}] {done}/{steps} steps: {ratios}", flush=True)
    out = []
    for name, loop in loops.items():
        moved = float(np.abs(np.asarray(loop.controller.mixture) - 1 / loop.K).max())
        parts = {k: v / (steps - 1) for k, v in clock.parts[name].items()}
        static_step = totals[name][1] / (steps - 1)
        parts["static step"] = static_step
        parts["max |w - 1/K|"] = moved
        if name == "tikmix_d":
            measured = [dt for dt, m in measuring[name] if m]
            other = [dt for dt, m in measuring[name] if not m] or [static_step]
            if measured:
                per_run = (np.mean(other) * (run_steps - len(measured)) + sum(measured)) / (run_steps * static_step)
                parts[f"x static over a {run_steps}-step run ({len(measured)} measurement)"] = per_run
        out.append((name, totals[name][0] / totals[name][1], parts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small,search", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--controllers", default=",".join(CONTROLLERS), help="comma list of: " + ", ".join(CONTROLLERS))
    ap.add_argument("--steps", type=int, default=40, help="steps of each run (whole runs: TiKMiX measures half-way)")
    ap.add_argument("--block", type=int, default=10, help="steps per interleaved block (DGA updates every 10)")
    ap.add_argument("--run-steps", type=int, default=200, help="run length TiKMiX's one measurement is amortised over")
    args = ap.parse_args()
    names = [n for n in args.controllers.split(",") if n]
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_controllers_"))
    try:
        for config in args.config.split(","):
            results[config] = bench(config, names, args.steps, args.block, tmp / config, args.run_steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for config, rows in results.items():
        print(
            f"\n{config}: {CONFIGS[config]['model']}, global batch {CONFIGS[config]['micro_batch']} x 128, "
            f"{args.steps} steps, interleaved blocks of {args.block}"
        )
        print(f"{'controller':<10} {'x static':>9}   where the extra time goes (s/step)")
        for name, ratio, parts in rows:
            detail = ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
            print(f"{name:<10} {ratio:>9.3f}   {detail}")


if __name__ == "__main__":
    main()
