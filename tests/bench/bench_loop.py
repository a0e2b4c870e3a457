"""Benchmark: mixtrain's training loop vs a minimal hand-written torch loop, and sampler planning.

    python tests/bench/bench_loop.py [--steps 40] [--rounds 3]

Both loops train the same GPT on the same data with the same optimizer, alternating in one
process, so machine noise hits both; the figure is the ratio of steps/s (mixtrain / hand-written),
median over rounds. The mixtrain side is the real ``Loop.train`` (sampler, per-domain loss
accounting, metrics.jsonl, progress bar) minus the one-off end-of-run work (final evaluation,
checkpoint, plots), which a real run amortises.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import make_shardset, tiny_config  # noqa: E402
from trainer.data.sampler import DomainSampler  # noqa: E402
from trainer.engines.torch_ddp import adamw  # noqa: E402
from trainer.loop import Loop  # noqa: E402
from trainer.models import build_model  # noqa: E402

MODEL = {"model.n_layer": 4, "model.n_head": 4, "model.d_model": 256, "model.max_seq_len": 128}


def mixtrain_steps_per_s(data: Path, run_dir: Path, steps: int) -> float:
    cfg = tiny_config(data, run_dir, **MODEL, **{"data.seq_len": 128, "train.steps": steps, "train.micro_batch": 8,
                                                 "train.eval_every": 0, "data.eval_sequences": 1, "engine.threads": 0,
                                                 "run.progress": True, "train.resume": "never"})
    loop = Loop(cfg)
    finish = {}
    original = loop._finish

    def timed_finish():
        t = time.perf_counter()
        out = original()
        finish["s"] = time.perf_counter() - t
        return out

    loop._finish = timed_finish
    t0 = time.perf_counter()
    loop.train()
    return steps / (time.perf_counter() - t0 - finish["s"])


def hand_steps_per_s(data: Path, steps: int, loop_cfg) -> float:
    """What a user would write by hand: forward, mean cross-entropy, backward, clip, AdamW."""
    from trainer.data.domains import load_data

    bundle = load_data(loop_cfg.data, quiet=True)
    torch.manual_seed(loop_cfg.train.seed)
    model = build_model(loop_cfg.model)
    opt = adamw(model, loop_cfg.train)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        views = [bundle.train[int(d)] for d in rng.integers(0, len(bundle.train), size=8)]
        batches.append(torch.from_numpy(np.stack([v.get([int(rng.integers(0, len(v)))])[0] for v in views])))
    t0 = time.perf_counter()
    for x in batches:
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def sampler_plan_seconds(shard: int = 1_000_000, repeats: int = 5) -> float:
    sizes = [116_000, 80_000, 20_000, 126_000, 20_000, 12_000, 28_000, 12_000]  # demo-like, seq 128
    s = DomainSampler(sizes, shard_size=shard, seed=0)
    w = np.random.default_rng(0).dirichlet(np.ones(len(sizes)))
    s.advance(s.plan_shard(w))  # warm the epoch-permutation cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        plan = s.plan_shard(w)
        times.append(time.perf_counter() - t)
        s.advance(plan)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_shardset(tmp / "data", n_docs=200)
        cfg = tiny_config(data, tmp / "x", **MODEL, **{"data.seq_len": 128})
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=320))  # as the loop resolves 257
        ratios = []
        for r in range(args.rounds):
            hand = hand_steps_per_s(data, args.steps, cfg)
            mine = mixtrain_steps_per_s(data, tmp / f"run{r}", args.steps)
            ratios.append(mine / hand)
            print(f"round {r}: mixtrain {mine:.2f} steps/s, hand-written {hand:.2f} steps/s, ratio {mine / hand:.3f}", flush=True)
        print(f"loop/hand-written steps-per-second ratio (median of {args.rounds}): {statistics.median(ratios):.3f}")
    print(f"sampler: plan a 1,000,000-sample shard over 8 domains: {sampler_plan_seconds() * 1000:.1f} ms (median of 5)")


if __name__ == "__main__":
    main()
