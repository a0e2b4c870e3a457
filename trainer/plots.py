"""PNG plots of a run: the weight trajectory (stacked area) and per-domain losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tracking import read_jsonl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ema(x: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    out = np.empty_like(x)
    acc = np.nan
    for i, v in enumerate(x):
        acc = v if not np.isfinite(acc) else (acc if not np.isfinite(v) else (1 - alpha) * acc + alpha * v)
        out[i] = acc
    return out


def _stacked(plt, path: Path, steps, W, domains, title: str, step_post: bool) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.stackplot(steps, W.T, labels=domains, step="post" if step_post else None)
    ax.set(xlabel="step", ylabel="weight", ylim=(0, 1), xlim=(steps[0], steps[-1]), title=title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, domains: list[str]) -> list[Path]:
    """weights.png: the controller's learned mixture per step when it has one (adaptive runs),
    else the sampling weights per shard; losses.png: per-domain training and validation loss."""
    run_dir = Path(run_dir)
    plt = _pyplot()
    written = []
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    learned = [r for r in metrics if f"mixture/learned/{domains[0]}" in r]
    shards = [r for r in read_jsonl(run_dir / "weights.jsonl") if not r.get("final")]
    if learned:
        steps = np.array([r["step"] for r in learned])
        W = np.array([[r[f"mixture/learned/{d}"] for d in domains] for r in learned])
        written.append(
            _stacked(plt, run_dir / "weights.png", steps, W, domains, "Learned domain weights", step_post=False)
        )
    elif shards:
        end = read_jsonl(run_dir / "weights.jsonl")[-1].get("end_step", shards[-1]["step"])
        steps = np.array([r["step"] for r in shards] + [end])
        W = np.array([[r["weights"][d] for d in domains] for r in shards])
        W = np.vstack([W, W[-1]])  # a shard's weights hold until the next boundary
        written.append(
            _stacked(
                plt, run_dir / "weights.png", steps, W, domains, "Domain weights (applied per shard)", step_post=True
            )
        )
    train = [r for r in metrics if "train/loss" in r]
    evals = [r for r in metrics if "eval/loss" in r]
    if train:
        fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(13 if evals else 7, 4.5), squeeze=False)
        ax = axes[0, 0]
        steps = np.array([r["step"] for r in train])
        for d in domains:
            y = np.array([r.get(f"train/loss/{d}", np.nan) for r in train], dtype=float)
            ax.plot(steps, _ema(y), label=d)
        ax.set(xlabel="step", ylabel="training loss (EMA 0.1)", title="Per-domain training loss")
        ax.legend(fontsize=8)
        if evals:
            ax = axes[0, 1]
            es = [r["step"] for r in evals]
            for d in domains:
                ax.plot(es, [r.get(f"eval/{d}/loss", np.nan) for r in evals], marker="o", label=d)
            targets = sorted({k.split("/")[1] for r in evals for k in r if k.startswith("target/")})
            for t in targets:
                ax.plot(
                    es,
                    [r.get(f"target/{t}/loss", np.nan) for r in evals],
                    linestyle="--",
                    marker="x",
                    label=f"target:{t}",
                )
            ax.set(xlabel="step", ylabel="validation loss", title="Per-domain validation loss")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = run_dir / "losses.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
