"""Benchmark: mixtrain's training loop vs a minimal hand-written torch loop, and sampler planning.

    python tests/bench/bench_loop.py [--steps 60] [--block 5]

Both loops train the same GPT on the same data with the same optimizer in one process, in
interleaved blocks of ``--block`` steps (order alternating), so drift in machine speed hits both
alike; the figure is the ratio of steps/s (mixtrain / hand-written) over all blocks, with the
per-block ratios' spread beside it. The mixtrain side is the real ``Loop.advance`` a run calls per
step (sampler, shard boundaries, per-domain loss accounting, the non-finite guard, metrics.jsonl,
the progress bar); the one-off construction and end-of-run work (final evaluation, checkpoint,
plots), which a real run amortises, are outside the timed blocks. One warm-up step each is untimed.
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
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import make_shardset, tiny_config

from trainer.data.domains import load_data
from trainer.data.sampler import DomainSampler
from trainer.engines.torch_ddp import adamw
from trainer.loop import Loop
from trainer.models import build_model

MODEL = {"model.n_layer": 4, "model.n_head": 4, "model.d_model": 256, "model.max_seq_len": 128}


def mixtrain_loop(data: Path, run_dir: Path, steps: int) -> Loop:
    cfg = tiny_config(
        data,
        run_dir,
        **MODEL,
        **{
            "data.seq_len": 128,
            "train.steps": steps,
            "train.micro_batch": 8,
            "train.eval_every": 0,
            "data.eval_sequences": 1,
            "engine.threads": 0,
            "run.progress": True,
            "train.resume": "never",
        },
    )
    return Loop(cfg)


class HandLoop:
    """What a user would write by hand: forward, mean cross-entropy, backward, clip, AdamW (the
    batches drawn up front, so its data costs nothing)."""

    def __init__(self, data: Path, steps: int, loop_cfg):
        bundle = load_data(loop_cfg.data, quiet=True)
        torch.manual_seed(loop_cfg.train.seed)
        self.model = build_model(loop_cfg.model)
        self.opt = adamw(self.model, loop_cfg.train)
        rng = np.random.default_rng(0)
        self.batches = []
        for _ in range(steps):
            views = [bundle.train[int(d)] for d in rng.integers(0, len(bundle.train), size=8)]
            self.batches.append(torch.from_numpy(np.stack([v.get([int(rng.integers(0, len(v)))])[0] for v in views])))

    def advance(self) -> None:
        x = self.batches.pop()
        logits = self.model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed_block(advance, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        advance()
    return time.perf_counter() - t


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
    ap.add_argument("--steps", type=int, default=60, help="timed steps per side")
    ap.add_argument("--block", type=int, default=5, help="steps per interleaved block")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_shardset(tmp / "data", n_docs=200)
        cfg = tiny_config(data, tmp / "x", **MODEL, **{"data.seq_len": 128})
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=320))  # as the loop resolves 257
        hand = HandLoop(data, args.steps + 1, cfg)
        loop = mixtrain_loop(data, tmp / "run", args.steps + 1)
        bar = tqdm(total=args.steps + 1, desc="train", unit="step", file=sys.stdout, mininterval=15)

        def mine():
            loop.advance(bar)

        hand.advance(), mine()  # warm-up: first-step allocations on both sides
        totals, ratios, done, flip = [0.0, 0.0], [], 0, False
        while done < args.steps:
            n = min(args.block, args.steps - done)
            sides = [(0, hand.advance), (1, mine)]
            pair = [0.0, 0.0]
            for side, advance in reversed(sides) if flip else sides:
                pair[side] = timed_block(advance, n)
            totals = [a + b for a, b in zip(totals, pair)]
            ratios.append(pair[0] / pair[1])
            done, flip = done + n, not flip
        bar.close()
        loop.close()
        ratio = totals[0] / totals[1]
        q = np.percentile(ratios, [25, 75])
        print(
            f"hand-written {args.steps / totals[0]:.2f} steps/s, mixtrain {args.steps / totals[1]:.2f} steps/s "
            f"over {args.steps} interleaved steps in blocks of {args.block}"
        )
        print(
            f"loop/hand-written steps-per-second ratio: {ratio:.3f} "
            f"(per block: median {statistics.median(ratios):.3f}, quartiles {q[0]:.3f}-{q[1]:.3f})"
        )
    print(
        f"sampler: plan a 1,000,000-sample shard over 8 domains: {sampler_plan_seconds() * 1000:.1f} ms (median of 5)"
    )


if __name__ == "__main__":
    main()
