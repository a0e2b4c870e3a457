"""Benchmark: every engine x precision x compile combination against a minimal hand-written torch
loop, side by side in one process, probe off; and what torch.compile's graph breaks cost when the
probe records.

    python tests/bench/bench_engines.py [--steps 30] [--block 5] [--model llama|gpt]

Each mixtrain side is a real ``Loop`` (static uniform mixture: no probe) stepping with
``Loop.advance`` (sampler, per-domain loss accounting, metrics, the MFU meter); the hand-written
sides are forward, mean cross-entropy, backward, clip, AdamW on pre-drawn batches of the same shape,
under ``torch.autocast`` for bf16 and with ``torch.compile`` on each block when compiled. All sides
step in interleaved blocks of ``--block`` steps, the order rotating, after two untimed warm-up
steps (compilation happens there). A mixtrain side's ratio is its steps/s over the hand-written
loop's at the same precision and compile setting (>= 0.95 is the target): "blocks" is the median
over the interleaved blocks of (hand-written block time / this side's block time), robust to a
load spike hitting one side's block; "total" is the ratio of whole timed totals. MFU = model FLOPs per
token (trainer/throughput.py) x tokens/s over the peak (on CPU: a measured GEMM at that precision).
The last table: DoGE (alignments and Gram from the probe in every training backward) compiled vs
eager, the cost of running the probe-aware layers eagerly between compiled regions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import make_shardset, tiny_config

from trainer import throughput
from trainer.data.domains import load_data
from trainer.engines.torch_ddp import adamw
from trainer.loop import Loop
from trainer.models import build_model

SEQ, BATCH = 128, 8
MODELS = {
    "llama": {"name": "llama", "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 128, "bias": False},
    "gpt": {"name": "gpt", "n_layer": 4, "n_head": 4, "d_model": 128},
}


def _config(data: Path, run_dir: Path, model: dict, engine: dict, mixture: str = "uniform"):
    return tiny_config(
        data,
        run_dir,
        **{
            "model": {**model, "max_seq_len": SEQ},
            "data.seq_len": SEQ,
            "train.steps": 10**6,
            "train.micro_batch": BATCH,
            "train.eval_every": 0,
            "train.checkpoint_every": 0,
            "data.eval_sequences": 1,
            "engine": {"threads": 0, **engine},
            "mixture": {"name": mixture},
            "train.resume": "never",
        },
    )


class HandLoop:
    """What a user would write by hand (bench_loop.py's, with autocast and compile as asked)."""

    def __init__(self, cfg, precision: str, compiled: bool, steps: int):
        bundle = load_data(cfg.data, quiet=True)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model)
        if compiled:
            for block in self.model.blocks:
                block.compile()
        self.opt = adamw(self.model, cfg.train)
        self.bf16 = precision == "bf16"
        rng = np.random.default_rng(0)
        self.batches = []
        for _ in range(steps):
            views = [bundle.train[int(d)] for d in rng.integers(0, len(bundle.train), size=BATCH)]
            self.batches.append(torch.from_numpy(np.stack([v.get([int(rng.integers(0, len(v)))])[0] for v in views])))

    def advance(self) -> None:
        x = self.batches.pop()
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with cast:
            logits = self.model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


@dataclasses.dataclass
class Side:
    label: str
    advance: object
    precision: str = "fp32"
    compiled: bool = False
    hand: bool = False
    seconds: float = 0.0
    blocks: list = dataclasses.field(default_factory=list)


def _mixtrain(data, root, model, label, engine, mixture="uniform") -> Side | None:
    try:
        loop = Loop(_config(data, root / label.replace(" ", "_"), model, engine, mixture))
    except Exception as e:  # an engine whose stack is absent here is reported, not fatal
        print(f"  {label}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None
    return Side(label, loop.advance, engine.get("precision", "fp32"), bool(engine.get("compile")))


def _interleave(sides: list[Side], steps: int, block: int) -> None:
    for side in sides:  # warm-up: allocations, compilation
        side.advance()
        side.advance()
    done, turn = 0, 0
    while done < steps:
        n = min(block, steps - done)
        order = sides[turn % len(sides) :] + sides[: turn % len(sides)]
        for side in order:
            t = time.perf_counter()
            for _ in range(n):
                side.advance()
            dt = time.perf_counter() - t
            side.seconds += dt
            side.blocks.append(dt / n)
        done, turn = done + n, turn + 1
        print(f"  {done}/{steps} steps per side", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side")
    ap.add_argument("--block", type=int, default=5, help="steps per interleaved block")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated")
    args = ap.parse_args()
    # DeepSpeed wants a launcher's environment even for one process
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    model = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_shardset(root / "data", n_docs=200)
        probe_cfg = _config(data, root / "x", model, {})
        cfg = dataclasses.replace(probe_cfg, model=dataclasses.replace(probe_cfg.model, vocab_size=320))
        per_token = throughput.flops_per_token(cfg.model, SEQ)
        sides: list[Side] = []
        precisions = args.precisions.split(",")
        print("building the sides")
        for precision in precisions:
            for compiled in (False, True):
                tag = f"{precision}{' compiled' if compiled else ''}"
                hand = HandLoop(cfg, precision, compiled, args.steps + 2)
                sides.append(Side(f"hand-written {tag}", hand.advance, precision, compiled, hand=True))
                side = _mixtrain(data, root, model, f"torch {tag}", {"precision": precision, "compile": compiled})
                sides += [side] if side else []
            for engine in ("fsdp", "megatron", "deepspeed"):
                side = _mixtrain(data, root, model, f"{engine} {precision}", {"name": engine, "precision": precision})
                sides += [side] if side else []
        probed = [
            _mixtrain(data, root, model, f"doge {mode}", {"compile": mode == "compiled"}, mixture="doge")
            for mode in ("eager", "compiled")
        ]
        sides += [s for s in probed if s]
        print(f"timing {len(sides)} sides, {args.steps} steps each, interleaved in blocks of {args.block}")
        _interleave(sides, args.steps, args.block)
        tokens = BATCH * SEQ
        print(
            f"\nmodel {args.model} {cfg.model.n_layer}x{cfg.model.d_model}, batch {BATCH} x {SEQ} tokens, "
            f"{per_token / 1e6:.1f} MFLOP/token; torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print(f"{'side':<26}{'steps/s':>9}{'tokens/s':>10}{'MFU':>8}  vs hand: blocks (quartiles), total")
        for side in sides[:-2] if len(probed) == 2 and all(probed) else sides:
            if side.label.startswith("doge"):
                continue
            hand = next(s for s in sides if s.hand and s.precision == side.precision and s.compiled == side.compiled)
            peak = throughput.peak_flops(torch.device("cpu"), side.precision)[0]
            rate = args.steps / side.seconds
            ratio = hand.seconds / side.seconds
            per_block = [h / m for h, m in zip(hand.blocks, side.blocks)]
            q = np.percentile(per_block, [25, 75])
            print(
                f"{side.label:<26}{rate:>9.2f}{rate * tokens:>10.0f}{rate * tokens * per_token / peak:>8.1%}  "
                + ("" if side.hand else f"{statistics.median(per_block):.3f} ({q[0]:.3f}-{q[1]:.3f}), {ratio:.3f}")
            )
        if len(probed) == 2 and all(probed):
            eager, comp = probed
            blocks = statistics.median(e / c for e, c in zip(eager.blocks, comp.blocks))
            print(
                f"\nprobe on (DoGE, alignments + Gram every step): compiled {args.steps / comp.seconds:.2f} steps/s, "
                f"eager {args.steps / eager.seconds:.2f} steps/s, compiled/eager: blocks {blocks:.3f}, total "
                f"{eager.seconds / comp.seconds:.3f}"
            )


if __name__ == "__main__":
    main()
