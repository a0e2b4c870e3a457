"""``mixtrain compare RUN [RUN ...]``: finished runs side by side, as a table and plots.

Each RUN is a run directory (``config.yaml`` + ``metrics.jsonl``) or a folder of runs: a Hydra
multirun directory (``runs/multirun/<time>/``, whose jobs ``0/``, ``1/`` ... are runs) or any
folder whose subfolders are runs. A multirun job is labelled by the overrides in its
``.hydra/overrides.yaml`` that differ between the jobs of that sweep (``mixture=temperature
train.seed=1``); a run directory by its name. ``--labels`` replaces the labels, one per run after
expansion.

The table (printed, and written to ``OUT/compare.md``) has one row per run:

- ``step``: the step of the run's last evaluation record in ``metrics.jsonl``;
- one column per domain: the final validation loss ``eval/<d>/loss`` of that record;
- ``avg``: the macro mean of those losses over domains; ``eval/loss``: the token-weighted loss;
- ``worst``: the domain with the highest final validation loss, and that loss;
- one ``target/<t>`` column per target set: ``target/<t>/loss`` of the same record;
- ``tokens``: training tokens per domain (the last ``mixture/tokens/<d>``), in the domain order
  of the header;
- ``weights``: ``train_domain_weights`` of ``weights.json`` (what ``mixture.weights_from`` would
  use: the time average for adaptive controllers), same order;
- ``train s``: seconds spent in training steps, the sum over logged steps of step tokens /
  ``perf/tokens_per_sec`` (evaluation, checkpoints and start-up excluded; the logs hold no clock
  times);
- ``wall s``: modification time of ``metrics.jsonl`` (its last line is the final evaluation) minus
  that of ``config.yaml`` (written when training starts, after the data are opened). A resumed run
  rewrites ``config.yaml``, so this is then the last session only; copies that did not keep the
  times make it meaningless.

Finished runs whose configurations differ only in ``train.seed`` (bookkeeping such as ``run.*``,
``train.resume`` or ``engine.threads`` ignored), with their last evaluation at the same step, get
an extra row: mean ± sample standard deviation (n − 1) across the seeds for every loss and time;
tokens and weights are the means, and ``worst`` is the worst domain of the mean losses.

Plots in OUT: ``compare_weights.png`` (one stacked weight trajectory per run: the controller's
learned mixture per step when the run logged one, ``mixture/learned/<d>``, else the sampling
weights per shard from ``weights.jsonl``), ``compare_valid.png`` (one panel per domain and target
set, one validation-loss curve per run) and ``compare_losses.png`` (bars of the average, token-
weighted and target losses per run, and per seed group with its standard deviation).

OUT is ``--out``, else the first argument when it is a multirun directory, else ``./compare``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

# Knobs that do not change what a run learns: runs differing only in these (and the seed) are one
# seed group.
BOOKKEEPING = {
    "run": None,  # the whole section: name, dir, wandb, plots, progress
    "train": (
        "seed",
        "resume",
        "fail_at_step",
        "fail_rank",
        "fail_in_checkpoint",
        "keep_checkpoints",
        "checkpoint_every",
        "log_every",
    ),
    "engine": ("threads",),
    "data": ("cache_dir",),
}
MISSING = "–"
PLOTS = ("compare_weights.png", "compare_valid.png", "compare_losses.png")


class CompareError(ValueError):
    """Bad input for ``mixtrain compare``; the message names the argument."""


@dataclass
class RunInfo:
    path: Path
    arg: str
    label: str
    config: dict
    domains: list[str]
    targets: list[str]
    eval_step: int | None
    losses: dict[str, float]  # domain -> final validation loss
    target_losses: dict[str, float]
    eval_loss: float | None
    curves: dict[str, tuple[list[int], list[float]]]  # "eval/<d>/loss" or "target/<t>/loss" -> (steps, values)
    tokens: dict[str, float]
    weights: dict[str, float] | None
    trajectory: tuple[np.ndarray, np.ndarray, str] | None  # steps, weights [n, K], what they are
    train_seconds: float | None
    wall_seconds: float | None
    overrides: list[str] = field(default_factory=list)

    @property
    def seed(self):
        return (self.config.get("train") or {}).get("seed")

    @property
    def finished(self) -> bool:
        return self.weights is not None

    @property
    def macro(self) -> float | None:
        return float(np.mean(list(self.losses.values()))) if self.losses else None

    @property
    def worst(self) -> tuple[str, float] | None:
        return max(self.losses.items(), key=lambda kv: kv[1]) if self.losses else None


@dataclass
class SeedGroup:
    label: str
    runs: list[RunInfo]

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


@dataclass
class Comparison:
    runs: list[RunInfo]
    groups: list[SeedGroup]
    domains: list[str]
    targets: list[str]
    table: str
    out: Path
    files: list[Path]


# ---- finding runs ---------------------------------------------------------------------------


def is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file()


def _job_key(p: Path):
    return (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)


def _overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        values = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return []
    return [str(v) for v in values] if isinstance(values, list) else []


def expand(arg: str) -> tuple[list[tuple[Path, str, list[str]]], bool]:
    """The runs an argument names, each with its label and overrides; and whether it was a folder
    of runs (a multirun directory) rather than one run."""
    path = Path(arg)
    if not path.exists():
        raise CompareError(f"RUN={arg!r}: no such directory")
    if not path.is_dir():
        raise CompareError(
            f"RUN={arg!r} is a file; give a run directory (config.yaml + metrics.jsonl) or a Hydra multirun directory"
        )
    if is_run(path):
        return [(path, path.name, _overrides(path))], False
    subdirs = sorted((p for p in path.iterdir() if p.is_dir()), key=_job_key)
    jobs = [p for p in subdirs if is_run(p)]
    for p in subdirs:
        if p not in jobs and (p / ".hydra").is_dir():
            print(
                f"mixtrain compare: warning: RUN={arg!r}: job {p.name} has no metrics.jsonl/config.yaml "
                "(failed or not started); left out",
                file=sys.stderr,
            )
    if not jobs:
        have = (
            "config.yaml but no metrics.jsonl"
            if (path / "config.yaml").is_file()
            else "no config.yaml and metrics.jsonl"
        )
        raise CompareError(
            f"RUN={arg!r} is not a run directory ({have}; a run writes both when it starts "
            "training) nor a multirun directory (none of its subdirectories is a run)"
        )
    overrides = [_overrides(j) for j in jobs]
    shared = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    out = []
    for job, ovr in zip(jobs, overrides):
        varying = [o for o in ovr if o not in shared]
        out.append((job, " ".join(varying) if varying else job.name, ovr))
    return out, True


# ---- reading a run --------------------------------------------------------------------------


def _read_jsonl(path: Path, arg: str) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # a run killed mid-write: drop the torn last line
                break
            raise CompareError(f"RUN={arg!r}: {path} line {n} is not JSON: {e}") from None
    return out


def _domains_of(records: list[dict]) -> list[str]:
    out: list[str] = []
    for rec in records:
        for k in rec:
            d = None
            if k.startswith("mixture/weight/"):
                d = k[len("mixture/weight/") :]
            elif k.startswith("eval/") and k.endswith("/loss") and k.count("/") == 2:
                d = k[len("eval/") : -len("/loss")]
            if d and d not in out:
                out.append(d)
    return out


def _train_seconds(records: list[dict]) -> float | None:
    """Σ step tokens / tokens_per_sec; a record logged every log_every steps stands for the steps
    since the previous one (their tokens are the difference of the cumulative counts)."""
    total, prev, seen = 0.0, 0.0, False
    for rec in records:
        if "perf/tokens_per_sec" not in rec:
            continue
        tokens = sum(v for k, v in rec.items() if k.startswith("mixture/tokens/"))
        tps = rec["perf/tokens_per_sec"]
        if tps and tps > 0 and tokens > prev:
            total += (tokens - prev) / tps
            seen = True
        prev = tokens
    return total if seen else None


def _trajectory(records: list[dict], shards: list[dict], domains: list[str]):
    learned = [r for r in records if domains and all(f"mixture/learned/{d}" in r for d in domains)]
    if learned:
        steps = np.array([r["step"] for r in learned], dtype=float)
        W = np.array([[r[f"mixture/learned/{d}"] for d in domains] for r in learned], dtype=float)
        return steps, W, "learned mixture per step"
    per_shard = [r for r in shards if not r.get("final") and isinstance(r.get("weights"), dict)]
    if not per_shard:
        return None
    end = next((r.get("end_step") for r in reversed(shards) if "end_step" in r), per_shard[-1]["step"])
    steps = np.array([r["step"] for r in per_shard] + [max(end, per_shard[-1]["step"])], dtype=float)
    W = np.array([[r["weights"].get(d, 0.0) for d in domains] for r in per_shard], dtype=float)
    return steps, np.vstack([W, W[-1]]), "sampling weights per shard"


def load_run(path: Path, arg: str, label: str, overrides: list[str] | None = None) -> RunInfo:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise CompareError(f"RUN={arg!r}: {path / 'config.yaml'} is not YAML: {e}") from None
    if not isinstance(config, dict):
        raise CompareError(f"RUN={arg!r}: {path / 'config.yaml'} is not a mixtrain config")
    records = _read_jsonl(path / "metrics.jsonl", arg)
    shards = _read_jsonl(path / "weights.jsonl", arg)
    weights = None
    if (path / "weights.json").is_file():
        try:
            obj = json.loads((path / "weights.json").read_text())
        except json.JSONDecodeError as e:
            raise CompareError(f"RUN={arg!r}: {path / 'weights.json'} is not JSON: {e}") from None
        if isinstance(obj, dict) and isinstance(obj.get("train_domain_weights"), dict):
            weights = {str(k): float(v) for k, v in obj["train_domain_weights"].items()}
    domains = _domains_of(records) or list(weights or {})
    evals = [r for r in records if any(k.startswith(("eval/", "target/")) for k in r)]
    last = evals[-1] if evals else {}
    losses = {d: float(last[f"eval/{d}/loss"]) for d in domains if f"eval/{d}/loss" in last}
    targets = [k.split("/")[1] for k in last if k.startswith("target/") and k.endswith("/loss")]
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for rec in evals:
        for k, v in rec.items():
            if (k.startswith("eval/") and k.count("/") == 2 or k.startswith("target/")) and k.endswith("/loss"):
                steps, values = curves.setdefault(k, ([], []))
                steps.append(int(rec["step"]))
                values.append(float(v))
    tok_rec = next((r for r in reversed(records) if any(k.startswith("mixture/tokens/") for k in r)), {})
    tokens = {d: float(tok_rec[f"mixture/tokens/{d}"]) for d in domains if f"mixture/tokens/{d}" in tok_rec}
    wall = None
    if records:
        wall = (path / "metrics.jsonl").stat().st_mtime - (path / "config.yaml").stat().st_mtime
        wall = wall if wall >= 0 else None  # config.yaml rewritten after the last log line: unknown
    return RunInfo(
        path=path,
        arg=arg,
        label=label,
        config=config,
        domains=domains,
        targets=targets,
        eval_step=int(last["step"]) if last else None,
        losses=losses,
        target_losses={t: float(last[f"target/{t}/loss"]) for t in targets},
        eval_loss=float(last["eval/loss"]) if "eval/loss" in last else None,
        curves=curves,
        tokens=tokens,
        weights=weights,
        trajectory=_trajectory(records, shards, domains),
        train_seconds=_train_seconds(records),
        wall_seconds=wall,
        overrides=overrides or [],
    )


def collect(args: list[str], labels: list[str] | None = None) -> tuple[list[RunInfo], bool]:
    """The runs of every argument, in order, with unique labels; and whether the first argument
    was a folder of runs."""
    if not args:
        raise CompareError("give at least one RUN (a run directory or a Hydra multirun directory)")
    found, first_is_folder = [], False
    for i, arg in enumerate(args):
        runs, folder = expand(arg)
        if i == 0:
            first_is_folder = folder
        found += [(path, arg, label, ovr, folder) for path, label, ovr in runs]
    if labels is not None:
        if len(labels) != len(found):
            raise CompareError(
                f"--labels: {len(labels)} label(s) for {len(found)} run(s) (after expanding multirun "
                f"directories: {', '.join(str(p) for p, *_ in found)})"
            )
        found = [(p, a, lab, o, f) for (p, a, _, o, f), lab in zip(found, labels)]
    else:
        names = [lab for _, _, lab, _, _ in found]
        if len(set(names)) < len(names):  # the same job name from two sweeps: say which sweep
            found = [(p, a, f"{Path(a).name}/{lab}" if folder else lab, o, folder) for p, a, lab, o, folder in found]
        seen: dict[str, int] = {}
        unique = []
        for p, a, lab, o, folder in found:
            seen[lab] = seen.get(lab, 0) + 1
            unique.append((p, a, lab if seen[lab] == 1 else f"{lab} #{seen[lab]}", o, folder))
        found = unique
    runs = [load_run(p, a, lab, o) for p, a, lab, o, _ in found]
    return runs, first_is_folder


# ---- seed groups ----------------------------------------------------------------------------


def _experiment_key(config: dict) -> str:
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for section, keys in BOOKKEEPING.items():
        if keys is None:
            values.pop(section, None)
        elif isinstance(values.get(section), dict):
            for k in keys:
                values[section].pop(k, None)
    return json.dumps(values, sort_keys=True, default=str)


def _seed_token(token: str) -> bool:
    return token.lstrip("+~").startswith("train.seed=")


def seed_groups(runs: list[RunInfo]) -> list[SeedGroup]:
    """Finished runs whose configurations differ only in train.seed and whose last evaluation is at
    the same step, when they have two or more distinct seeds."""
    by_key: dict[tuple[str, int | None], list[RunInfo]] = {}
    for r in runs:
        if r.finished:
            by_key.setdefault((_experiment_key(r.config), r.eval_step), []).append(r)
    with_overrides = [set(r.overrides) for r in runs if r.overrides]
    everywhere = set.intersection(*with_overrides) if with_overrides else set()
    groups = []
    for members in by_key.values():
        seeds = [r.seed for r in members]
        if len(set(map(str, seeds))) < 2:
            continue
        # label: the members' common label without the seed; else the overrides they share that set
        # them apart from the other runs; else all their labels
        stripped = {" ".join(t for t in r.label.split() if not _seed_token(t)) for r in members}
        base = stripped.pop() if len(stripped) == 1 and "" not in stripped else ""
        if not base and all(r.overrides for r in members):
            base = " ".join(
                o
                for o in members[0].overrides
                if not _seed_token(o) and o not in everywhere and all(o in r.overrides for r in members)
            )
        base = base or ", ".join(r.label for r in members)
        groups.append(SeedGroup(f"{base} (seeds {', '.join(map(str, seeds))})", members))
    return groups


# ---- the table ------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 3) -> str:
    return MISSING if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _secs(v: float | None) -> str:
    return _f(v, 2 if v is not None and v < 10 else 1 if v is not None and v < 1000 else 0)


def _pm(values: list[float | None], digits: int = 3) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return MISSING
    if len(vals) < 2:
        return _f(vals[0], digits)
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def _compact(values: dict[str, float] | None, domains: list[str], fmt: str) -> str:
    if not values:
        return MISSING
    return "/".join(format(values[d], fmt) if d in values else MISSING for d in domains)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _union(lists) -> list[str]:
    out: list[str] = []
    for items in lists:
        out += [x for x in items if x not in out]
    return out


def render_table(runs: list[RunInfo], groups: list[SeedGroup], domains: list[str], targets: list[str]) -> str:
    order = "/".join(domains)
    header = [
        "run",
        "step",
        *domains,
        "avg",
        "eval/loss",
        "worst",
        *(f"target/{t}" for t in targets),
        f"tokens ({order})",
        f"weights ({order})",
        "train s",
        "wall s",
    ]
    rows = []
    for r in runs:
        worst = r.worst
        rows.append(
            [
                r.label + ("" if r.finished else " (unfinished)"),
                MISSING if r.eval_step is None else str(r.eval_step),
                *(_f(r.losses.get(d)) for d in domains),
                _f(r.macro),
                _f(r.eval_loss),
                MISSING if worst is None else f"{worst[0]} {worst[1]:.3f}",
                *(_f(r.target_losses.get(t)) for t in targets),
                _compact(r.tokens, domains, ".0f"),
                _compact(r.weights, domains, ".3f"),
                _secs(r.train_seconds),
                _secs(r.wall_seconds),
            ]
        )
    for g in groups:
        mean_losses = {d: float(np.mean(v)) for d in domains if (v := [r.losses[d] for r in g.runs if d in r.losses])}
        worst = max(mean_losses.items(), key=lambda kv: kv[1]) if mean_losses else None
        mean_tokens = {
            d: float(np.mean(v))
            for d in domains
            if len(v := [r.tokens[d] for r in g.runs if d in r.tokens]) == len(g.runs)
        }
        ws = [r.weights for r in g.runs if r.weights]
        mean_weights = (
            {d: float(np.mean([w[d] for w in ws])) for d in domains if all(d in w for w in ws)}
            if len(ws) == len(g.runs)
            else None
        )
        rows.append(
            [
                f"mean ± sd: {g.label}",
                MISSING if g.runs[0].eval_step is None else str(g.runs[0].eval_step),
                *(_pm([r.losses.get(d) for r in g.runs]) for d in domains),
                _pm([r.macro for r in g.runs]),
                _pm([r.eval_loss for r in g.runs]),
                MISSING if worst is None else f"{worst[0]} {worst[1]:.3f}",
                *(_pm([r.target_losses.get(t) for r in g.runs]) for t in targets),
                _compact(mean_tokens, domains, ".0f"),
                _compact(mean_weights, domains, ".3f"),
                _pm([r.train_seconds for r in g.runs], 2),
                _pm([r.wall_seconds for r in g.runs], 2),
            ]
        )
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    notes = [
        "",
        "Final validation loss per domain (last evaluation record, at `step`); avg = macro mean over domains; "
        "eval/loss = token-weighted; worst = the domain with the highest loss.",
        "tokens = training tokens per domain (last `mixture/tokens/<d>`); weights = `train_domain_weights` of "
        "weights.json (what `mixture.weights_from` uses).",
        "train s = sum of step times from `perf/tokens_per_sec` (no evaluation, checkpoints or start-up); wall s = "
        "mtime(metrics.jsonl) − mtime(config.yaml) (the last session only if the run was resumed).",
    ]
    if groups:
        notes.append(
            "mean ± sd rows: runs whose configs differ only in train.seed; sd = sample standard deviation "
            "(n − 1) across seeds; worst, tokens and weights of those rows are of the means."
        )
    notes += ["", "Runs:"] + [f"- {_cell(r.label)}: `{r.path}`" for r in runs]
    return "\n".join(lines + notes) + "\n"


# ---- plots ----------------------------------------------------------------------------------


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def plot_weights(plt, runs: list[RunInfo], domains: list[str], path: Path) -> Path:
    rows, cols = _grid(len(runs))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows + 0.8), squeeze=False, sharey=True)
    colors = dict(zip(domains, _colors(len(domains))))
    for ax, r in zip(axes.flat, runs):
        if r.trajectory is None:
            ax.text(0.5, 0.5, "no weights logged", ha="center", va="center", transform=ax.transAxes)
        else:
            steps, W, what = r.trajectory
            idx = [r.domains.index(d) for d in domains if d in r.domains]
            names = [d for d in domains if d in r.domains]
            ax.stackplot(
                steps,
                W[:, idx].T,
                labels=names,
                colors=[colors[d] for d in names],
                step="post" if what.startswith("sampling") else None,
            )
            ax.set_xlim(steps[0], steps[-1])
            ax.set_xlabel(f"step ({what})", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(r.label, fontsize=9)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[d]) for d in domains]
    fig.legend(handles, domains, loc="lower center", ncol=min(len(domains), 8), fontsize=8)
    fig.suptitle("Domain weights")
    fig.tight_layout(rect=(0, 0.8 / (3.3 * rows + 0.8) + 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_validation(plt, runs: list[RunInfo], domains: list[str], targets: list[str], path: Path) -> Path:
    panels = [(f"eval/{d}/loss", d) for d in domains] + [(f"target/{t}/loss", f"target: {t}") for t in targets]
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.9), squeeze=False)
    colors = _colors(len(runs))
    for ax, (key, title) in zip(axes.flat, panels):
        for r, c in zip(runs, colors):
            if key in r.curves:
                steps, values = r.curves[key]
                ax.plot(steps, values, marker="o", markersize=3, color=c, label=r.label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("validation loss", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, marker="o") for c in colors]
    fig.legend(handles, [r.label for r in runs], loc="lower center", ncol=min(len(runs), 4), fontsize=8)
    legend_rows = math.ceil(len(runs) / 4)
    fig.tight_layout(rect=(0, min(0.4, 0.3 * legend_rows / (3.2 * rows + 0.9)) + 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bars(plt, runs: list[RunInfo], groups: list[SeedGroup], targets: list[str], path: Path) -> Path:
    metrics = [("avg (macro)", lambda r: r.macro), ("eval/loss", lambda r: r.eval_loss)]
    metrics += [(f"target/{t}", lambda r, t=t: r.target_losses.get(t)) for t in targets]
    panels = [("per run", [(r.label, [[get(r)] for _, get in metrics]) for r in runs])]
    if groups:
        panels.append(
            ("mean ± sd over seeds", [(g.label, [[get(r) for r in g.runs] for _, get in metrics]) for g in groups])
        )
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(7, 1.6 * len(metrics) * max(len(runs), 2) ** 0.5 + 3), 4.2 * len(panels)),
        squeeze=False,
    )
    for ax, (title, bars) in zip(axes[:, 0], panels):
        n = len(bars)
        width = 0.8 / n
        x = np.arange(len(metrics))
        lo, hi = np.inf, -np.inf
        for i, ((label, values), color) in enumerate(zip(bars, _colors(n))):
            clean = [[v for v in vs if v is not None and math.isfinite(v)] for vs in values]
            mean = np.array([np.mean(v) if v else np.nan for v in clean])
            err = (
                np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in clean])
                if title.startswith("mean")
                else None
            )
            pos = x - 0.4 + width * (i + 0.5)
            ax.bar(pos, mean, width, yerr=err, capsize=3 if err is not None else 0, color=color, label=label)
            for px, m, e in zip(pos, mean, err if err is not None else np.zeros_like(mean)):
                if np.isfinite(m):
                    ax.annotate(
                        f"{m:.3f}",
                        (px, m + e),
                        xytext=(0, 2),
                        textcoords="offset points",
                        ha="center",
                        fontsize=6,
                        rotation=90 if n > 4 else 0,
                    )
            spread = err if err is not None else np.zeros_like(mean)
            if np.isfinite(mean).any():
                lo = min(lo, np.nanmin(mean - spread))
                hi = max(hi, np.nanmax(mean + spread))
        if np.isfinite(lo) and hi > 0:
            # losses of compared runs differ by little: start the axis near the lowest bar (said on the axis)
            pad = max(0.1 * (hi - lo), 0.01 * abs(hi))
            ax.set_ylim(max(0.0, lo - 3 * pad), hi + 2 * pad)
        ax.set_xticks(x, [m for m, _ in metrics], fontsize=8)
        ax.set_ylabel("final validation loss" + (" (axis not from 0)" if ax.get_ylim()[0] > 0 else ""), fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(
    runs: list[RunInfo], groups: list[SeedGroup], domains: list[str], targets: list[str], out: Path
) -> list[Path]:
    from ..plots import _pyplot

    plt = _pyplot()
    return [
        plot_weights(plt, runs, domains, out / PLOTS[0]),
        plot_validation(plt, runs, domains, targets, out / PLOTS[1]),
        plot_bars(plt, runs, groups, targets, out / PLOTS[2]),
    ]


# ---- entry points ---------------------------------------------------------------------------


def compare(
    args: list[str], *, out: str | os.PathLike | None = None, labels: list[str] | None = None, plots: bool = True
) -> Comparison:
    """Load the runs, build the table, write ``compare.md`` and the plots into the output folder."""
    runs, first_is_folder = collect([str(a) for a in args], labels)
    domains = _union(r.domains for r in runs)
    targets = _union(r.targets for r in runs)
    groups = seed_groups(runs)
    table = render_table(runs, groups, domains, targets)
    out_dir = Path(out) if out is not None else (Path(args[0]) if first_is_folder else Path("compare"))
    if out_dir.exists() and not out_dir.is_dir():
        raise CompareError(f"--out={str(out_dir)!r} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    md = out_dir / "compare.md"
    md.write_text(table)
    files.append(md)
    if plots:
        files += write_plots(runs, groups, domains, targets, out_dir)
    return Comparison(runs, groups, domains, targets, table, out_dir, files)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="runs side by side: final losses, weights, tokens, time; plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory or Hydra multirun directory (its jobs)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where compare.md and the PNGs go (default: the first "
        "RUN when it is a multirun directory, else ./compare)",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="one label per run, after expanding multirun directories (put it after the RUNs)",
    )
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write the table only")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        result = compare(args.runs, out=args.out, labels=args.labels, plots=args.plots)
    except CompareError as e:
        raise SystemExit(f"mixtrain compare: {e}") from None
    sys.stdout.write(result.table)
    print(f"wrote {', '.join(str(f) for f in result.files)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import standalone

    return standalone(add_parser, "compare", argv)


if __name__ == "__main__":
    raise SystemExit(main())
