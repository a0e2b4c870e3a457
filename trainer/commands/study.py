"""``mixtrain study``: which mixture trains the best main model at an equal token budget, on data
with planted structure whose right answer is known.

The data (``mixtrain data planted``): the demo corpus's 8 real domains re-tokenized with a 2048-id
BPE (so the transformer, not the embedding table, holds most parameters), a duplicate domain
(``code_dup``, a disjoint half of code's training documents) and two noise domains (unigram
draws), none of the three with a validation split. Evaluation and the macro average stay over the
8 real domains. Uniform over the 11 then wastes 2/11 of the tokens on noise and double-weights code;
the **oracle** static mixture (1/8 per real domain, code's share split with its duplicate, 0 on
noise) is a condition, so every method's gain can be read as a share of the oracle's.

Three phases, each a set of ordinary mixtrain runs under ``OUT`` (default ``runs/study``):

1. **Proxies** (``OUT/proxies/<name>``, ``+experiment=study_proxy``: a smaller model than the main
   one, batches of 4 sequences per domain): ``uniform`` (DoReMi's reference model), ``doremi``
   (η = 1) and ``doremi_eta01`` (η = 0.1), ``doge`` (toward the evaluated domains' held-out slices)
   and ``doge_mix`` (toward the official mix of every domain), ``tikmix_d`` and ``--random`` static mixtures
   drawn from a flat Dirichlet (RegMix-style, shorter runs; the draw with the lowest macro
   validation loss is ``random_best``). Up to ``--jobs`` at once.
2. **Main runs**: ONE Hydra multirun, printed before it starts so it can be rerun by hand,
   ``mixtrain train -m +experiment=study +study=<conditions> train.seed=<seeds> data.path=<planted>``
   with ``MIXTRAIN_STUDY=OUT`` in the environment (``trainer/conf/study/`` reads the proxies' weights and
   the oracle's from there). Every condition trains the same model for the same tokens;
   ``dga_humaneval`` runs DGA online on the main model toward the HumanEval few-shot pool, ``pike``
   and ``rnb`` run PiKE and R&B online on it (their own gradient statistics, no proxy).
3. **Comparison**: ``mixtrain compare OUT/main --out OUT`` (every run, plots) and ``OUT/study.md``:
   per condition the macro validation loss, its paired difference from uniform with the standard
   error over evaluation sequences and seeds (``trainer.paired``), the share of the oracle's gain,
   the noise domains' weight, the target losses and the wall-clock (main run and the proxies it
   needed), then the checks the study exists for, each met or missed.

A phase whose runs already finished is skipped, so an interrupted study continues where it stopped.
``--quick`` keeps every condition and phase at a lower resolution (shorter runs, one seed, fewer
evaluation sequences, four random draws) in about ten minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .paired import PairedDiff, load_sequences, metric, paired_difference

CONDITIONS = (
    "uniform",
    "oracle",
    "temperature",
    "unimax",
    "doremi",
    "doremi_eta01",
    "doge",
    "doge_mix",
    "tikmix_d",
    "dga_humaneval",
    "pike",
    "rnb",
    "random_best",
)
"""trainer/conf/study/<name>.yaml."""

STATIC = (
    "uniform",
    "oracle",
    "temperature",
    "unimax",
    "doremi",
    "doremi_eta01",
    "doge",
    "doge_mix",
    "tikmix_d",
    "random_best",
)
"""Conditions whose main run trains on fixed weights (DGA, PiKE and R&B steer online)."""

LEARNED = ("doremi", "doremi_eta01", "doge", "doge_mix", "tikmix_d", "dga_humaneval", "pike", "rnb", "random_best")
"""Conditions whose mixture a method chose (their noise weight is checked)."""

NEEDS = {
    "doremi": ("uniform", "doremi"),
    "doremi_eta01": ("uniform", "doremi_eta01"),
    "doge": ("doge",),
    "doge_mix": ("doge_mix",),
    "tikmix_d": ("tikmix_d",),
    "random_best": ("random",),
}
"""Proxy runs a condition needs ("random" = the Dirichlet draws)."""

COMMON = ["run.wandb=disabled", "run.plots=false", "run.progress=false"]

QUICK = {
    "main": ["train.steps=40", "train.warmup_steps=4", "train.eval_every=20", "data.eval_sequences=48"],
    "proxy": ["train.steps=40", "train.warmup_steps=4", "train.eval_every=20", "data.eval_sequences=48"],
    "random_steps": 20,
    "random": 4,
    "seeds": "1",
}
"""--quick: the same structure at lower resolution."""

HUMANEVAL = "humaneval"


@dataclass
class Proxy:
    name: str
    overrides: list[str]
    after: tuple[str, ...] = ()


class StudyError(RuntimeError):
    pass


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


def _finished(run: Path) -> bool:
    return (run / "weights.json").is_file()


def dirichlet_draws(domains: list[str], n: int, seed: int) -> list[dict[str, float]]:
    """n flat-Dirichlet mixtures over the domains, a pure function of (domains, n, seed)."""
    rng = np.random.default_rng(seed)
    return [dict(zip(domains, map(float, rng.dirichlet(np.ones(len(domains)))))) for _ in range(n)]


# ---- the data -----------------------------------------------------------------------------------


@dataclass
class Planted:
    path: Path
    domains: list[str]
    real: list[str]
    duplicate: dict | None
    noise: list[str]

    @classmethod
    def load(cls, path: Path) -> Planted:
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise StudyError(f"--data {path}: no manifest.json (build the study's data with `mixtrain data planted`)")
        meta = json.loads(manifest.read_text())
        if "planted" not in meta:
            raise StudyError(
                f"--data {path} is not a planted shard set (no 'planted' entry in its manifest); "
                "build one with `mixtrain data planted [--source SHARDS]`"
            )
        order = [d for d in meta.get("domain_order", []) if d in meta["domains"]] or list(meta["domains"])
        p = meta["planted"]
        return cls(path=path, domains=order, real=list(p["real"]), duplicate=p.get("duplicate"), noise=list(p["noise"]))

    def oracle(self) -> dict[str, float]:
        """1/R per real domain (R of them), the duplicated domain's share split with its copy, 0 on noise."""
        w = {d: 0.0 for d in self.domains}
        for d in self.real:
            w[d] = 1.0 / len(self.real)
        if self.duplicate:
            half = w[self.duplicate["domain"]] / 2
            w[self.duplicate["domain"]] = w[self.duplicate["copy"]] = half
        return w

    def noise_weight(self, weights: dict[str, float]) -> float:
        total = sum(weights.values())
        return sum(weights.get(d, 0.0) for d in self.noise) / total if total else float("nan")


def prepare_data(data: str | None, source: str | None, out: Path) -> Planted:
    """The planted shard set: ``--data`` as given, or built (cached) from ``--source`` / the demo corpus."""
    if data:
        return Planted.load(Path(data).resolve())
    from .planted import build_planted

    print(f"[study] data: the planted shard set from {source or 'the demo corpus'} (built on first use)", flush=True)
    return Planted.load(build_planted(source, quiet=True).resolve())


# ---- proxies ------------------------------------------------------------------------------------


def plan_proxies(
    out: Path,
    conditions: list[str],
    planted: Planted,
    n_random: int,
    random_steps: int,
    seed: int,
    overrides: list[str],
) -> list[Proxy]:
    wanted = {p for c in conditions for p in NEEDS.get(c, ())}
    base = ["+experiment=study_proxy", f"data.path={planted.path}", *COMMON, *overrides]
    reference = f"mixture.reference={out / 'proxies' / 'uniform'}"
    proxies = []
    if "uniform" in wanted:
        proxies.append(Proxy("uniform", ["mixture=uniform", *base]))
    if "doremi" in wanted:
        proxies.append(Proxy("doremi", ["mixture=doremi", reference, *base], after=("uniform",)))
    if "doremi_eta01" in wanted:
        proxies.append(
            Proxy("doremi_eta01", ["mixture=doremi", "mixture.reweight_eta=0.1", reference, *base], after=("uniform",))
        )
    # DoGE at the official universal μ = 0.01 (a 150-step proxy has ~1/70 of the official run's Σ η_t/μ at
    # the search's μ = 0.04, and its weights barely move), with a reference of >= 2 sequences per domain:
    # "doge" steers toward the domains evaluation reports (heldout:*, one target each, scores summed as the
    # official code sums over its target domains: 3 sequences per target), "doge_mix" toward the official
    # mix of every training domain, noise and duplicate included (heldout).
    if "doge" in wanted:
        per_target = -(-2 * len(planted.domains) // len(planted.real))
        proxies.append(
            Proxy(
                "doge",
                [
                    "mixture=doge",
                    "mixture.target=heldout:*",
                    "mixture.mu=0.01",
                    f"mixture.ref_sequences={per_target}",
                    *base,
                ],
            )
        )
    if "doge_mix" in wanted:
        proxies.append(
            Proxy(
                "doge_mix",
                [
                    "mixture=doge",
                    "mixture.target=heldout",
                    "mixture.mu=0.01",
                    f"mixture.ref_sequences={2 * len(planted.domains)}",
                    *base,
                ],
            )
        )
    if "tikmix_d" in wanted:
        proxies.append(Proxy("tikmix_d", ["mixture=tikmix_d", *base]))
    if "random" in wanted:
        draws_dir = out / "proxies" / "random"
        draws_dir.mkdir(parents=True, exist_ok=True)
        for k, w in enumerate(dirichlet_draws(planted.domains, n_random, seed)):
            path = draws_dir / f"draw_{k}.json"
            path.write_text(json.dumps(w, indent=1) + "\n")
            proxies.append(
                Proxy(
                    f"random/{k}",
                    [
                        "mixture=static",
                        f"mixture.weights_from={path}",
                        *base,
                        f"train.steps={random_steps}",
                        f"train.warmup_steps={max(1, random_steps // 10)}",
                        f"train.eval_every={random_steps}",
                    ],
                )
            )
    return proxies


def _run_logged(cmd: list[str], log: Path, env: dict) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def run_proxies(out: Path, proxies: list[Proxy], jobs: int, env: dict) -> None:
    """Each proxy as a `mixtrain train` into OUT/proxies/<name>; dependencies wait for their runs."""
    todo = [p for p in proxies if not _finished(out / "proxies" / p.name)]
    ready = {p.name for p in proxies} - {p.name for p in todo}
    if not todo:
        print(f"[study] proxies: all {len(proxies)} finished already", flush=True)
        return
    print(
        f"[study] proxies: {len(todo)} to run ({len(proxies) - len(todo)} finished), {jobs} at a time; "
        f"logs in {out / 'proxies'}/<name>.log",
        flush=True,
    )
    failed: list[str] = []

    def one(p: Proxy) -> None:
        run = out / "proxies" / p.name
        t0 = time.time()
        rc = _run_logged(_cli(["train", *p.overrides, f"hydra.run.dir={run}"]), out / "proxies" / f"{p.name}.log", env)
        ok = rc == 0 and _finished(run)
        status = "done" if ok else f"FAILED (exit {rc})"
        print(f"[study]   {p.name:<13} {status} in {time.time() - t0:.0f} s", flush=True)
        if not ok:
            failed.append(p.name)

    pending = list(todo)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending:
            wave = [p for p in pending if all(a in ready for a in p.after)]
            if not wave:
                raise StudyError(f"proxies {[p.name for p in pending]} wait on runs that are not planned")
            list(pool.map(one, wave))
            if failed:
                raise StudyError(f"proxy run(s) failed: {', '.join(failed)}; see their .log in {out / 'proxies'}")
            ready |= {p.name for p in wave}
            pending = [p for p in pending if p not in wave]


def pick_random_best(out: Path, n_random: int, planted: Planted) -> tuple[int, list[tuple[int, float]]]:
    """The Dirichlet draw whose proxy has the lowest macro validation loss over the real domains;
    writes OUT/proxies/random_best.json (its weights) and returns (index, [(draw, macro loss)])."""
    scores = []
    for k in range(n_random):
        run = out / "proxies" / "random" / str(k)
        groups = load_sequences(run)
        if groups is None:
            raise StudyError(f"{run}: no final evaluation to rank the draw by")
        scores.append((k, metric(groups, [f"eval/{d}/loss" for d in planted.real])))
    best = min(scores, key=lambda s: s[1])[0]
    weights = json.loads((out / "proxies" / "random" / f"draw_{best}.json").read_text())
    (out / "proxies" / "random_best.json").write_text(json.dumps(weights, indent=1) + "\n")
    return best, scores


# ---- main runs ----------------------------------------------------------------------------------


def main_command(
    out: Path, conditions: list[str], seeds: list[int], planted: Planted, overrides: list[str], jobs: int
) -> list[str]:
    # Several jobs at once go through Hydra's joblib launcher (processes, one intra-op thread each);
    # one at a time through the basic launcher.
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    return [
        "train",
        "-m",
        "+experiment=study",
        f"+study={','.join(conditions)}",
        f"train.seed={','.join(map(str, seeds))}",
        f"data.path={planted.path}",
        *COMMON,
        *overrides,
        *launcher,
        f"hydra.sweep.dir={out / 'main'}",
    ]


def _main_finished(out: Path, n: int) -> bool:
    main = out / "main"
    return main.is_dir() and sum(_finished(p) for p in main.iterdir() if p.is_dir()) >= n


def run_main(
    out: Path, conditions: list[str], seeds: list[int], planted: Planted, overrides: list[str], jobs: int, env: dict
) -> None:
    n = len(conditions) * len(seeds)
    if _main_finished(out, n):
        print(f"[study] main: all {n} runs finished already", flush=True)
        return
    args = main_command(out, conditions, seeds, planted, overrides, jobs)
    print(
        f"[study] main: {n} runs, one Hydra multirun (log: {out / 'main.log'}):\n"
        f"  MIXTRAIN_STUDY={out} mixtrain {' '.join(args)}",
        flush=True,
    )
    t0 = time.time()
    # Stream the multirun's own job lines ("#3 : +study=doge train.seed=1") so progress is visible.
    (out / "main").mkdir(parents=True, exist_ok=True)
    with (out / "main.log").open("w") as log:
        proc = subprocess.Popen(_cli(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if re.search(r"#\d+ : ", line) or line.startswith("[mixtrain] done") or "Error" in line:
                print(f"[study]   {line.strip()}  ({time.time() - t0:.0f} s)", flush=True)
        rc = proc.wait()
    if rc != 0 or not _main_finished(out, n):
        raise StudyError(f"the main multirun failed (exit {rc}); see {out / 'main.log'}")


# ---- the study table ----------------------------------------------------------------------------


@dataclass
class Condition:
    name: str
    runs: list = field(default_factory=list)  # compare.RunInfo, one per seed
    sequences: dict = field(default_factory=dict)  # seed -> {group: per-sequence losses}
    proxy_seconds: float = 0.0

    def mean(self, fn) -> float:
        values = [fn(r) for r in self.runs if fn(r) is not None]
        return float(np.mean(values)) if values else float("nan")

    def sd(self, fn) -> float:
        values = [fn(r) for r in self.runs if fn(r) is not None]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _condition_of(run) -> str:
    for o in run.overrides:
        if o.startswith("+study="):
            return o.split("=", 1)[1]
    return run.label


def _proxy_seconds(out: Path, name: str) -> float:
    """Wall-clock of the proxy runs a condition needed (the uniform reference counts for DoReMi)."""
    from .compare import load_run

    total = 0.0
    for proxy in NEEDS.get(name, ()):
        runs = sorted((out / "proxies" / "random").glob("[0-9]*")) if proxy == "random" else [out / "proxies" / proxy]
        for run in runs:
            if (run / "metrics.jsonl").is_file():
                total += load_run(run, str(run), proxy).wall_seconds or 0.0
    return total


def gather(out: Path, runs) -> dict[str, Condition]:
    by: dict[str, Condition] = {}
    for r in runs:
        c = by.setdefault(_condition_of(r), Condition(_condition_of(r)))
        c.runs.append(r)
        seqs = load_sequences(r.path)
        if seqs is None:
            raise StudyError(
                f"{r.path}: no {r.path / 'eval_sequences.npz'} (a run from before per-sequence evaluation?)"
            )
        c.sequences[r.seed] = seqs
    for c in by.values():
        c.proxy_seconds = _proxy_seconds(out, c.name)
    return by


@dataclass
class Analysis:
    conditions: dict[str, Condition]
    planted: Planted
    vs_uniform: dict[str, PairedDiff]
    targets: list[str]

    @property
    def macro_keys(self) -> list[str]:
        return [f"eval/{d}/loss" for d in self.planted.real]

    def diff(self, a: str, b: str, keys: list[str] | None = None) -> PairedDiff:
        return paired_difference(self.conditions[a].sequences, self.conditions[b].sequences, keys or self.macro_keys)

    def macro(self, name: str) -> tuple[float, float]:
        c = self.conditions[name]
        per_seed = [metric(s, self.macro_keys) for s in c.sequences.values()]
        return float(np.mean(per_seed)), float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0

    def recovered(self, name: str) -> float | None:
        """The share of the oracle's macro gain over uniform that a condition recovers."""
        if "oracle" not in self.vs_uniform or name not in self.vs_uniform:
            return None
        gain = -self.vs_uniform["oracle"].mean
        return -self.vs_uniform[name].mean / gain if gain > 0 else None


def analyse(out: Path, runs, planted: Planted) -> Analysis:
    conditions = gather(out, runs)
    if "uniform" not in conditions:
        raise StudyError("the study's table is relative to uniform: add uniform to --conditions")
    keys = [f"eval/{d}/loss" for d in planted.real]
    vs = {
        n: paired_difference(c.sequences, conditions["uniform"].sequences, keys)
        for n, c in conditions.items()
        if n != "uniform"
    }
    targets = sorted({t for c in conditions.values() for r in c.runs for t in r.target_losses})
    return Analysis(conditions, planted, vs, targets)


def _pm(diff: PairedDiff) -> str:
    return f"{diff.mean:+.4f} ± {diff.se:.4f}{' ✓' if diff.resolved() else ''}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds and math.isfinite(seconds) else "–"


def render(analysis: Analysis) -> str:
    """Markdown: conditions ranked by macro validation loss over the real domains, paired differences
    from uniform with their SE, oracle share, noise weight, targets, wall-clock; then the checks."""
    a = analysis
    order = sorted(a.conditions, key=lambda n: a.macro(n)[0])
    head = [
        "rank",
        "condition",
        "seeds",
        "macro valid loss (mean ± sd)",
        "Δ vs uniform (± paired SE)",
        "oracle gain",
        "noise weight",
        *[f"{t} loss" for t in a.targets],
        "main run s",
        "proxies s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(order, 1):
        c = a.conditions[name]
        m, s = a.macro(name)
        rec = a.recovered(name)
        noise = np.mean([a.planted.noise_weight(r.weights) for r in c.runs if r.weights])
        cells = [
            str(i),
            name,
            ",".join(str(r.seed) for r in c.runs),
            f"{m:.4f} ± {s:.4f}",
            "–" if name == "uniform" else _pm(a.vs_uniform[name]),
            "–" if rec is None or name in ("uniform", "oracle") else f"{100 * rec:.0f}%",
            f"{noise:.3f}" if a.planted.noise else "–",
            *[f"{c.mean(lambda r, t=t: r.target_losses.get(t)):.4f}" for t in a.targets],
            _seconds(c.mean(lambda r: r.wall_seconds)),
            _seconds(c.proxy_seconds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r.seed for c in a.conditions.values() for r in c.runs}, key=str)
    lines += [
        "",
        f"Macro = mean validation loss over the {len(a.planted.real)} real domains "
        f"({', '.join(a.planted.real)}); "
        f"seeds {','.join(map(str, seeds))}. Δ = paired difference from uniform (same seeds, same evaluation "
        "sequences), SE over evaluation sequences and seeds (trainer/paired.py); ✓ = |Δ| ≥ 2 SE. Oracle gain = "
        "the share of the oracle's Δ a condition recovers. Noise weight = the exported mixture's total weight "
        f"on {', '.join(a.planted.noise) or 'the noise domains'}. Seconds: one main run's wall-clock (mean over "
        "seeds), and the proxies the condition needed (wall-clock, jobs running side by side).",
        "",
        "Checks:",
        "",
    ]
    lines += [f"- {text}" for text in checks(a)]
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def checks(a: Analysis) -> list[str]:
    out = []
    for name in LEARNED:
        if name in a.conditions and a.planted.noise:
            w = np.mean([a.planted.noise_weight(r.weights) for r in a.conditions[name].runs if r.weights])
            out.append(f"noise weight of {name}: {w:.3f} (target ≤ 0.03) → {_verdict(w <= 0.03)}")
    for name in ("doge", "doge_mix", "doremi", "doremi_eta01", "pike", "rnb"):
        rec = a.recovered(name)
        if rec is not None:
            d = a.vs_uniform[name]
            met = rec >= 0.5 and d.mean < 0 and d.resolved()
            out.append(
                f"{name} recovers {100 * rec:.0f}% of the oracle's gain (Δ {_pm(d)} vs oracle "
                f"{_pm(a.vs_uniform['oracle'])}; target ≥ 50%, resolved) → {_verdict(met)}"
            )
    baselines = [b for b in ("unimax", "temperature") if b in a.conditions]
    if baselines:
        winners = []
        for name in LEARNED:
            if name in a.conditions:
                diffs = [a.diff(name, b) for b in baselines]
                if all(d.mean < 0 and d.resolved() for d in diffs):
                    winners.append(name)
        detail = "; ".join(
            f"{n}: " + ", ".join(f"vs {b} {_pm(a.diff(n, b))}" for b in baselines) for n in LEARNED if n in a.conditions
        )
        out.append(
            f"a learned mixture beats {' and '.join(baselines)} on the macro (resolved): "
            f"{', '.join(winners) or 'none'} ({detail}) → {_verdict(bool(winners))}"
        )
    if "dga_humaneval" in a.conditions and HUMANEVAL in a.targets:
        key = [f"target/{HUMANEVAL}/loss"]
        parts, ok = [], True
        for name in STATIC:
            if name in a.conditions:
                d = a.diff("dga_humaneval", name, key)
                parts.append(f"{name} {_pm(d)}")
                ok &= d.mean < 0 and d.resolved()
        out.append(
            f"DGA → humaneval beats every static condition on humaneval loss (Δ ± SE): {', '.join(parts)} "
            f"→ {_verdict(ok)}"
        )
    return out


def plot(analysis: Analysis, path: Path) -> Path:
    """Δ vs uniform with ±2 SE per condition, beside its wall-clock (main run + proxies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(analysis.vs_uniform, key=lambda n: analysis.vs_uniform[n].mean)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 2))
    means = [analysis.vs_uniform[n].mean for n in names]
    errors = [2 * analysis.vs_uniform[n].se for n in names]
    left.barh(names, means, xerr=errors, color=["tab:green" if m < 0 else "tab:red" for m in means], capsize=3)
    left.axvline(0, color="black", lw=0.8)
    left.set_xlabel("Δ macro validation loss vs uniform (nats, ± 2 paired SE)")
    minutes = [
        (analysis.conditions[n].mean(lambda r: r.wall_seconds) + analysis.conditions[n].proxy_seconds) / 60
        for n in names
    ]
    right.scatter(minutes, means)
    for n, x, y in zip(names, minutes, means):
        right.annotate(n, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    right.axhline(0, color="black", lw=0.8)
    right.set_xlabel("wall-clock per condition: one main run + its proxies (min)")
    right.set_ylabel("Δ macro vs uniform")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the command --------------------------------------------------------------------------------


def study(
    out: Path,
    conditions: list[str],
    seeds: list[int],
    jobs: int,
    n_random: int,
    random_steps: int,
    seed: int,
    overrides: list[str],
    *,
    data: str | None = None,
    source: str | None = None,
    quick: bool = False,
) -> Path:
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise StudyError(f"--conditions {','.join(unknown)}; allowed: {', '.join(CONDITIONS)}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    planted = prepare_data(data, source, out)
    (out / "oracle.json").write_text(json.dumps(planted.oracle(), indent=1) + "\n")
    main_overrides, proxy_overrides = list(overrides), list(overrides)
    if quick:
        main_overrides, proxy_overrides = QUICK["main"] + main_overrides, QUICK["proxy"] + proxy_overrides
    env = {**os.environ, "MIXTRAIN_STUDY": str(out), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run_proxies(out, plan_proxies(out, conditions, planted, n_random, random_steps, seed, proxy_overrides), jobs, env)
    if "random_best" in conditions:
        best, scores = pick_random_best(out, n_random, planted)
        print(
            "[study] random draws (proxy macro valid loss): "
            + ", ".join(f"#{k} {v:.3f}" for k, v in scores)
            + f" → best #{best}",
            flush=True,
        )
    run_main(out, conditions, seeds, planted, main_overrides, jobs, env)
    from .compare import compare

    comparison = compare([str(out / "main")], out=out)
    analysis = analyse(out, comparison.runs, planted)
    table = render(analysis)
    (out / "study.md").write_text(table)
    figure = plot(analysis, out / "study_delta.png")
    print(
        f"\n{table}\n[study] {time.time() - t0:.0f} s; in {out}: {', '.join(p.name for p in comparison.files)} "
        f"(per-run table and plots), study.md (this table), {figure.name}",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mixtrain study",
        description="The quality study on planted data: proxies (DoReMi, DoGE, TiKMiX-D, random Dirichlet mixtures), "
        "then one Hydra multirun of the main model under every condition and seed, then paired comparisons "
        "against uniform and the oracle.",
    )
    parser.add_argument("--out", default="runs/study", help="study folder (default: runs/study); rerun to continue")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma list from {', '.join(CONDITIONS)}")
    parser.add_argument("--seeds", default=None, help="training seeds of the main runs (default: 1,2,3; --quick: 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, proxies and main runs (default: 2)")
    parser.add_argument(
        "--random", type=int, default=None, help="Dirichlet draws for random_best (default: 8; --quick: 4)"
    )
    parser.add_argument(
        "--random-steps", type=int, default=None, help="steps of each random-draw proxy (default: 100; --quick: 20)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Dirichlet draws (default: 0)")
    parser.add_argument(
        "--data", default=None, help="a planted shard set (default: built from --source or the demo corpus)"
    )
    parser.add_argument(
        "--source", default=None, help="shard set to build the planted set from (default: the demo corpus)"
    )
    parser.add_argument("--quick", action="store_true", help="every phase at lower resolution, about ten minutes")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. model.d_model=128)")
    args = parser.parse_args(argv)
    seeds = args.seeds or (QUICK["seeds"] if args.quick else "1,2,3")
    n_random = args.random if args.random is not None else (QUICK["random"] if args.quick else 8)
    random_steps = args.random_steps
    if random_steps is None:
        random_steps = QUICK["random_steps"] if args.quick else 100
    try:
        study(
            Path(args.out),
            [c for c in args.conditions.split(",") if c],
            [int(s) for s in seeds.split(",")],
            args.jobs,
            n_random,
            random_steps,
            args.seed,
            args.overrides,
            data=args.data,
            source=args.source,
            quick=args.quick,
        )
    except StudyError as e:
        print(f"mixtrain study: {e}", file=sys.stderr)
        return 1
    return 0
