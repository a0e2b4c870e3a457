"""Benchmark: the per-domain gradient probe's cost on a CPU training step.

    python tests/bench/bench_probe.py [--rounds 5] [--accum 2] [--threads 0]

A tied-embedding GPT (4 layers, d = 256, seq 256, vocab 512, so the LM head does not dominate on
CPU); a step = ``--accum`` micro-batches of 16 sequences, forward + backward + clip + AdamW as in
engines/torch_ddp.py. Sequences of the step are assigned to domains round-robin and every
micro-batch's rows are sorted by domain. For K = 8 and K = 32, timed side by side in one process,
interleaved within each round, median over rounds:

  plain   the step with no probe;
  align   the step with Tier A alignments against 1 reference (its reference gradient, one
          16-sequence forward/backward, is timed separately as "reference pass");
  gram    the step with exact norms + Gram (K x P accumulators);
  oracle  (K = 8) the naive path: per micro-batch one forward and one masked backward per domain
          (torch.autograd.grad), per-domain K x P accumulators, their sum as the training gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.config import ModelConfig, TrainConfig  # noqa: E402
from trainer.engines.torch_ddp import adamw  # noqa: E402
from trainer.models import build_model, token_losses  # noqa: E402
from trainer.probe import Probe, ProbeSpec  # noqa: E402

MODEL = ModelConfig(n_layer=4, n_head=4, d_model=256, max_seq_len=256, vocab_size=512)
MICRO_BATCH, SEQ = 16, 256


def make_step(K: int, accum: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``accum`` micro-batches; sequence s of the step belongs to domain s % K; rows sorted by domain."""
    doms = torch.arange(MICRO_BATCH * accum) % K
    out = []
    for m in range(accum):
        d = doms[m * MICRO_BATCH : (m + 1) * MICRO_BATCH].sort().values
        out.append((torch.randint(0, MODEL.vocab_size, (MICRO_BATCH, SEQ + 1), generator=gen), d))
    return out


class Bench:
    """One model and optimizer shared by every mode, so the modes differ only in the probe work."""

    def __init__(self, K: int, accum: int):
        torch.manual_seed(0)
        self.K = K
        self.model = build_model(MODEL)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = adamw(self.model, TrainConfig())
        self.probe = Probe(self.model, K, exact_budget_bytes=2 << 30)
        gen = torch.Generator().manual_seed(K)
        self.mbs = make_step(K, accum, gen)
        self.ref_batch = torch.randint(0, MODEL.vocab_size, (MICRO_BATCH, SEQ + 1), generator=gen)
        self.tokens_per_rank = sum(d.numel() * SEQ for _, d in self.mbs)
        counts = torch.zeros(K)
        for _, d in self.mbs:
            counts.index_add_(0, d, torch.full((d.numel(),), float(SEQ)))
        self.scale = (self.tokens_per_rank / counts).numpy()  # loss weights 1
        self.ref = self.reference_pass()

    def reference_pass(self) -> list[torch.Tensor]:
        return self.probe.reference_gradient(token_losses(self.model, self.ref_batch).mean())

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, spec: ProbeSpec | None) -> None:
        """The training step; with a spec, every micro-batch is probed and the statistics finished."""
        if spec is not None:
            self.probe.start(spec, [self.ref] if spec.refs else None)
        for tokens, doms in self.mbs:
            with self.probe.micro_batch(doms) if spec is not None else contextlib.nullcontext():
                (token_losses(self.model, tokens).sum() / self.tokens_per_rank).backward()
        if spec is not None:
            self.probe.finish(self.scale)
        self.optimizer_step()

    def oracle(self) -> torch.Tensor:
        """One forward and K masked backwards per micro-batch; the Gram from K x P accumulators."""
        acc = torch.zeros(self.K, sum(p.numel() for p in self.params))
        for tokens, doms in self.mbs:
            losses = token_losses(self.model, tokens)
            present = doms.unique().tolist()
            for j, i in enumerate(present):
                grads = torch.autograd.grad(
                    losses[doms == i].sum() / self.tokens_per_rank, self.params, retain_graph=j < len(present) - 1
                )
                acc[i] += torch.cat([g.reshape(-1) for g in grads])
        total = acc.sum(0)
        offset = 0
        for p in self.params:
            p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        gram = acc @ acc.T
        self.optimizer_step()
        return gram


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(K: int, accum: int, rounds: int, with_oracle: bool) -> dict[str, float]:
    bench = Bench(K, accum)
    modes = {
        "plain": lambda: bench.step(None),
        "align": lambda: bench.step(ProbeSpec(refs=1)),
        "gram": lambda: bench.step(ProbeSpec(norms=True, gram=True)),
        "reference pass": bench.reference_pass,
    }
    if with_oracle:
        modes["oracle"] = bench.oracle
    for fn in modes.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for r in range(rounds):
        for name, fn in modes.items():
            times[name].append(timed(fn))
        print(f"  K={K} round {r}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per step (2: all 32 domains occur)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_params = build_model(MODEL).num_params()
    print(
        f"GPT {MODEL.n_layer}x{MODEL.d_model}, vocab {MODEL.vocab_size}, tied, {n_params / 1e6:.2f}M parameters; "
        f"step = {args.accum} x {MICRO_BATCH} x {SEQ} tokens; {torch.get_num_threads()} threads; median of "
        f"{args.rounds}"
    )
    results = {K: run(K, args.accum, args.rounds, with_oracle=K == 8) for K in (8, 32)}
    print(
        f"\n{'K':>3} {'plain s':>8} {'align s':>8} {'gram s':>8} {'ref pass s':>10} {'align/plain':>11} "
        f"{'gram/plain':>10}"
    )
    for K, t in results.items():
        print(
            f"{K:>3} {t['plain']:>8.3f} {t['align']:>8.3f} {t['gram']:>8.3f} {t['reference pass']:>10.3f} "
            f"{t['align'] / t['plain']:>11.3f} {t['gram'] / t['plain']:>10.3f}"
        )
    t8 = results[8]
    print(
        f"\nK=8 oracle (one masked backward per domain): {t8['oracle']:.3f}s = {t8['oracle'] / t8['plain']:.2f}x "
        "plain; "
        f"oracle/Gram-probe speed-up {t8['oracle'] / t8['gram']:.2f}x"
    )
    print("targets: align/plain <= 1.15, gram/plain <= 1.30, oracle/gram >= 4")


if __name__ == "__main__":
    main()
