"""What a finished run leaves beside its checkpoints, and the summary it prints.

weights.json (exported and final weights, the run id), weights.yaml (the average as a static
mixture), blend.txt (Megatron's ``--data-path`` blend), eval_sequences.npz (the final evaluation
sequence by sequence, for paired comparisons between runs) and, with ``run.plots``, the plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics
from .weights_io import megatron_blend, write_weights, yaml_text


@dataclass
class RunResult:
    run_dir: Path
    step: int
    domains: list[str]
    final_weights: np.ndarray
    average_weights: np.ndarray
    eval: dict


def write(result: RunResult, *, mixture: str, run_id: str, prefixes: list[str], per_sequence: dict) -> None:
    """Rank 0: the run's weight files and the final evaluation per sequence."""
    run_dir, domains, avg = result.run_dir, result.domains, result.average_weights
    write_weights(run_dir / "weights.json", domains, avg, result.final_weights, mixture, result.step, run_id=run_id)
    if per_sequence:
        np.savez(run_dir / "eval_sequences.npz", **per_sequence)
    (run_dir / "blend.txt").write_text(megatron_blend(domains, avg, prefixes) + "\n")
    average = dict(zip(domains, map(float, avg)))
    (run_dir / "weights.yaml").write_text(yaml_text(average, origin=str(run_dir), which="average"))


def summary(result: RunResult, tokens_seen: np.ndarray, exported: str, steers_on_eval: list[str]) -> str:
    """One screen: exported weights next to uniform and the last shard's, tokens, losses."""
    ev, avg, final, K = result.eval, result.average_weights, result.final_weights, len(result.domains)
    lines = [f"{'domain':<14}{'uniform':>9}{'exported':>10}{'final':>9}{'tokens':>12}{'val loss':>10}"]
    for i, d in enumerate(result.domains):
        vl = ev.get(metrics.eval_key(d))
        lines.append(
            f"{d:<14}{1 / K:>9.3f}{avg[i]:>10.3f}{final[i]:>9.3f}{tokens_seen[i]:>12.0f}"
            f"{'' if vl is None else f'{vl:>10.3f}'}"
        )
    for k, v in ev.items():
        if k.startswith("target/"):
            lines.append(f"{k:<44}{v:>10.3f}")
    if metrics.EVAL_LOSS in ev:
        per = {d: ev[metrics.eval_key(d)] for d in result.domains if metrics.eval_key(d) in ev}
        lines.append(
            f"eval/loss {ev[metrics.EVAL_LOSS]:.3f} | macro {ev[metrics.EVAL_MACRO]:.3f} | "
            f"best {min(per, key=per.get)} | worst {max(per, key=per.get)}"
        )
    if steers_on_eval:
        lines.append(
            "NOTE: this mixture steered on data that evaluation reports, so its evaluation is optimistic: "
            + "; ".join(steers_on_eval)
        )
    lines.append(
        f"weights: {result.run_dir / 'weights.json'} (exported = {exported}); "
        f"reuse with: mixtrain train mixture=static mixture.weights_from={result.run_dir}"
    )
    return f"done: {result.step} steps | run dir {result.run_dir}\n" + "\n".join(lines)


def banner(loop) -> list[str]:
    """The lines a run prints before its first step: where it runs, on what, with which mixture."""
    cfg = loop.cfg
    n_params = sum(p.numel() for p in loop.engine.model.parameters())
    lines = [
        f"run dir {loop.run_dir} | {loop.world} rank(s) on {loop.engine.device} | model {n_params / 1e6:.2f}M "
        f"params | {loop.K} domains | global batch {loop.global_batch} x {cfg.data.seq_len} tokens | shard "
        f"{loop.sampler.shard_size} sequences = {cfg.data.steps_per_shard} steps | mixture {cfg.mixture['name']}"
    ]
    e = cfg.engine
    knobs = [e.precision] + [k for k in ("compile", "activation_checkpointing") if getattr(e, k)]
    line = f"engine {e.name} ({', '.join(knobs)}) | model {cfg.model.name}"
    meter = next((cb for cb in loop.callbacks if hasattr(cb, "peak_source")), None)
    lines.append(line + (f" | {meter.describe()}" if meter is not None else ""))
    if cfg.data.subset != "all":
        lines.append(
            f"data.subset={cfg.data.subset} (data.holdout_fraction={cfg.data.holdout_fraction}): drawing from "
            f"{int(loop.sampler.sizes.sum())} of {int(loop.data.train_samples.sum())} training samples"
        )
    if cfg.curriculum.name != "none":
        online = next((cb for cb in loop.callbacks if cb.name == "curriculum"), None)
        extra = (
            f"scores {loop.scores_meta['dir']}"
            if loop.scores_meta
            else f"online proxy {online.num_params / 1e6:.2f}M params, pool {cfg.curriculum.pool_factor}x"
        )
        lines.append(f"curriculum {cfg.curriculum.name}: {extra}")
    return lines
