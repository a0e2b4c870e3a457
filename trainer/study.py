"""``mixtrain study``: which mixture gives the best small model at an equal token budget.

Three phases, each a set of ordinary mixtrain runs under ``OUT`` (default ``runs/study``):

1. **Proxies** (``OUT/proxies/<name>``, each a ``mixtrain search`` on a smaller model than the main
   one, ``model.d_model=32``): ``uniform`` (DoReMi's reference model), ``doremi`` (needs it),
   ``doge`` (``mixture.mu=0.04`` as in the main job), ``tikmix_d``, and ``--random`` static mixtures
   drawn from a flat Dirichlet (RegMix-style, shorter runs); the draw with the lowest macro-average
   validation loss becomes ``OUT/proxies/random_best.json``. Up to ``--jobs`` proxies run at once.
2. **Main runs**: ONE Hydra multirun, printed before it starts so it can be rerun by hand,
   ``mixtrain train -m +experiment=study +study=<conditions> train.seed=<seeds>``
   with ``MIXTRAIN_STUDY=OUT`` in the environment (the ``conf/study/`` conditions read the proxies'
   weights from there). Every condition trains the same model for the same tokens.
3. **Comparison**: ``mixtrain compare OUT/main --out OUT`` (``compare.md`` and the PNGs) and
   ``OUT/study.md``: conditions ranked by mean macro-average validation loss, with the spread
   between seeds, the target-set losses, and the checks the study exists for (DoGE below uniform;
   each DGA target below uniform and below the best random mixture), each marked met or missed.

A phase whose runs already finished is skipped, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CONDITIONS = ("uniform", "temperature", "doremi", "doge", "tikmix_d", "dga_humaneval", "dga_champ", "random_best")
"""conf/study/<name>.yaml, in the order of the issue's (a)-(h)."""

NEEDS = {"doremi": ("uniform", "doremi"), "doge": ("doge",), "tikmix_d": ("tikmix_d",),
         "random_best": ("random",)}
"""Proxy runs a condition needs ("random" = the Dirichlet draws)."""

PROXY_MODEL = ["model.d_model=32"]
"""Proxies are half the main model's width (conf/experiment/study.yaml uses model=tiny, d_model 64)."""

COMMON = ["run.wandb=disabled", "run.plots=false"]


@dataclass
class Proxy:
    name: str
    overrides: list[str]
    after: tuple[str, ...] = ()
    extra: list[str] = field(default_factory=list)


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


def _domains(overrides: list[str]) -> list[str]:
    """The training domains of the data the study runs on (the demo corpus is built on first use)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .cli import CONF_DIR
    from .config import load_config
    from .data.domains import load_data

    data_overrides = [o for o in overrides if o.startswith(("data=", "data."))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=study", *data_overrides])
    OmegaConf.register_new_resolver("ceil_div", lambda a, b: -(-int(a) // int(b)), replace=True)
    return list(load_data(load_config(OmegaConf.to_container(cfg, resolve=True)).data, quiet=True).domains)


def plan_proxies(out: Path, conditions: list[str], n_random: int, random_steps: int, seed: int,
                 domains: list[str] | None, overrides: list[str]) -> list[Proxy]:
    wanted = {p for c in conditions for p in NEEDS.get(c, ())}
    proxies = []
    base = [*PROXY_MODEL, *COMMON, *overrides]
    if "uniform" in wanted:
        proxies.append(Proxy("uniform", ["mixture=uniform", *base]))
    if "doremi" in wanted:
        proxies.append(Proxy("doremi", ["mixture=doremi", f"mixture.reference={out / 'proxies' / 'uniform'}", *base],
                             after=("uniform",)))
    if "doge" in wanted:
        proxies.append(Proxy("doge", ["mixture=doge", "mixture.mu=0.04", *base]))
    if "tikmix_d" in wanted:
        proxies.append(Proxy("tikmix_d", ["mixture=tikmix_d", *base]))
    if "random" in wanted:
        draws_dir = out / "proxies" / "random"
        draws_dir.mkdir(parents=True, exist_ok=True)
        for k, w in enumerate(dirichlet_draws(domains or [], n_random, seed)):
            path = draws_dir / f"draw_{k}.json"
            path.write_text(json.dumps(w, indent=1) + "\n")
            proxies.append(Proxy(f"random/{k}", ["mixture=static", f"mixture.weights_from={path}", *base,
                                                 f"train.steps={random_steps}",
                                                 f"train.warmup_steps={max(1, random_steps // 10)}",
                                                 f"train.eval_every={random_steps}"]))
    return proxies


def _run_logged(cmd: list[str], log: Path, env: dict) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def run_proxies(out: Path, proxies: list[Proxy], jobs: int, env: dict) -> None:
    """Each proxy as `mixtrain search` into OUT/proxies/<name>; dependencies wait for their runs."""
    todo = [p for p in proxies if not _finished(out / "proxies" / p.name)]
    done_names = {p.name for p in proxies} - {p.name for p in todo}
    if not todo:
        print(f"[study] proxies: all {len(proxies)} finished already", flush=True)
        return
    print(f"[study] proxies: {len(todo)} to run ({len(proxies) - len(todo)} finished), {jobs} at a time; "
          f"logs in {out / 'proxies'}/<name>.log", flush=True)
    failed: list[str] = []

    def one(p: Proxy) -> None:
        run = out / "proxies" / p.name
        cmd = _cli(["search", *p.overrides, f"hydra.run.dir={run}"])
        t0 = time.time()
        rc = _run_logged(cmd, out / "proxies" / f"{p.name}.log", env)
        status = "done" if rc == 0 and _finished(run) else f"FAILED (exit {rc})"
        print(f"[study]   {p.name:<12} {status} in {time.time() - t0:.0f} s", flush=True)
        if status != "done":
            failed.append(p.name)
        else:
            done_names.add(p.name)

    waves: list[list[Proxy]] = []
    pending = list(todo)
    ready = set(done_names)
    while pending:
        wave = [p for p in pending if all(a in ready for a in p.after)]
        if not wave:
            raise StudyError(f"proxies {[p.name for p in pending]} wait on runs that are not planned")
        waves.append(wave)
        ready |= {p.name for p in wave}
        pending = [p for p in pending if p not in wave]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for wave in waves:
            list(pool.map(one, wave))
            if failed:
                raise StudyError(f"proxy run(s) failed: {', '.join(failed)}; see their .log in {out / 'proxies'}")


def pick_random_best(out: Path, n_random: int) -> tuple[int, list[tuple[int, float]]]:
    """The Dirichlet draw whose proxy has the lowest macro-average validation loss; writes
    OUT/proxies/random_best.json (its weights) and returns (index, [(draw, macro loss)])."""
    from .compare import load_run

    scores = []
    for k in range(n_random):
        run = out / "proxies" / "random" / str(k)
        info = load_run(run, str(run), f"random/{k}")
        if info.macro is None:
            raise StudyError(f"{run}: no validation record to rank the draw by")
        scores.append((k, info.macro))
    best = min(scores, key=lambda s: s[1])[0]
    weights = json.loads((out / "proxies" / "random" / f"draw_{best}.json").read_text())
    (out / "proxies" / "random_best.json").write_text(json.dumps(weights, indent=1) + "\n")
    return best, scores


def main_command(out: Path, conditions: list[str], seeds: list[int], overrides: list[str], jobs: int) -> list[str]:
    # Several jobs at once go through Hydra's joblib launcher (processes, one intra-op thread each);
    # one at a time through the basic launcher.
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    return ["train", "-m", "+experiment=study", f"+study={','.join(conditions)}",
            f"train.seed={','.join(map(str, seeds))}", *COMMON, *overrides, *launcher, f"hydra.sweep.dir={out / 'main'}"]


def _main_finished(out: Path, n: int) -> bool:
    main = out / "main"
    return main.is_dir() and sum(_finished(p) for p in main.iterdir() if p.is_dir()) >= n


def run_main(out: Path, conditions: list[str], seeds: list[int], overrides: list[str], jobs: int, env: dict) -> None:
    n = len(conditions) * len(seeds)
    if _main_finished(out, n):
        print(f"[study] main: all {n} runs finished already", flush=True)
        return
    args = main_command(out, conditions, seeds, overrides, jobs)
    print(f"[study] main: {n} runs, one Hydra multirun (log: {out / 'main.log'}):\n"
          f"  MIXTRAIN_STUDY={out} mixtrain {' '.join(args)}", flush=True)
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


# ---- the study table --------------------------------------------------------------------------


def _condition_of(run) -> str:
    for o in run.overrides:
        if o.startswith("+study="):
            return o.split("=", 1)[1]
    return run.label


def _stats(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(runs) -> str:
    """Markdown: conditions ranked by mean macro validation loss, seeds' spread, targets, and the
    study's checks met/missed."""
    by: dict[str, list] = {}
    for r in runs:
        by.setdefault(_condition_of(r), []).append(r)
    targets = sorted({t for r in runs for t in r.target_losses})
    rows = []
    for cond, members in by.items():
        macro = _stats([r.macro for r in members])
        tl = {t: _stats([r.target_losses[t] for r in members if t in r.target_losses]) for t in targets}
        rows.append((cond, macro, tl, [r.seed for r in members], members))
    rows.sort(key=lambda row: row[1][0])
    uni = next((row for row in rows if row[0] == "uniform"), None)
    head = ["rank", "condition", "seeds", "macro valid loss (mean ± sd)", "Δ vs uniform", *[f"{t} loss" for t in targets],
            "worst domain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (cond, (m, s), tl, seeds, members) in enumerate(rows, 1):
        delta = f"{m - uni[1][0]:+.3f}" if uni else "–"
        losses = {d: float(np.mean([r.losses[d] for r in members])) for d in members[0].losses}
        worst = max(losses.items(), key=lambda kv: kv[1])
        cells = [str(i), cond, ",".join(map(str, seeds)), f"{m:.3f} ± {s:.3f}", delta,
                 *[f"{tl[t][0]:.3f} ± {tl[t][1]:.3f}" for t in targets], f"{worst[0]} {worst[1]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *checks(rows, uni)]
    return "\n".join(lines) + "\n"


def checks(rows, uni) -> list[str]:
    by = {row[0]: row for row in rows}
    out = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    if uni and "doge" in by:
        d, u = by["doge"][1], uni[1]
        out.append(f"- DoGE weights vs uniform, macro valid loss: {d[0]:.3f} ± {d[1]:.3f} vs {u[0]:.3f} ± {u[1]:.3f} "
                   f"→ {verdict(d[0] < u[0])}")
    for cond, target in (("dga_humaneval", "humaneval"), ("dga_champ", "champ")):
        if cond not in by or target not in by[cond][2]:
            continue
        m = by[cond][2][target][0]
        parts, ok = [], True
        for other in ("uniform", "random_best"):
            if other in by and target in by[other][2]:
                o = by[other][2][target][0]
                parts.append(f"{other} {o:.3f}")
                ok &= m < o
        out.append(f"- DGA → {target}: {target} loss {m:.3f} vs {', '.join(parts)} → {verdict(ok)}")
    return out


def study(out: Path, conditions: list[str], seeds: list[int], jobs: int, n_random: int, random_steps: int,
          seed: int, overrides: list[str]) -> Path:
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise StudyError(f"--conditions {','.join(unknown)}; allowed: {', '.join(CONDITIONS)}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MIXTRAIN_STUDY": str(out), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    domains = _domains(overrides) if "random_best" in conditions else None
    run_proxies(out, plan_proxies(out, conditions, n_random, random_steps, seed, domains, overrides), jobs, env)
    if "random_best" in conditions:
        best, scores = pick_random_best(out, n_random)
        print("[study] random draws (macro valid loss): "
              + ", ".join(f"#{k} {v:.3f}" for k, v in scores) + f" → best #{best}", flush=True)
    run_main(out, conditions, seeds, overrides, jobs, env)
    from .compare import compare

    comparison = compare([str(out / "main")], out=out)
    table = summarize(comparison.runs)
    (out / "study.md").write_text(table)
    print(f"\n{table}\n[study] {time.time() - t0:.0f} s; in {out}: {', '.join(p.name for p in comparison.files)} "
          f"(per-run table and plots), study.md (this ranking)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mixtrain study",
        description="The quality study: proxies (DoReMi, DoGE, TiKMiX-D, random Dirichlet mixtures), then one "
                    "Hydra multirun of the main model under every condition and seed, then the comparison.")
    parser.add_argument("--out", default="runs/study", help="study folder (default: runs/study); rerun to continue")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma list from {', '.join(CONDITIONS)}")
    parser.add_argument("--seeds", default="1,2", help="training seeds of the main runs (default: 1,2)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, proxies and main runs (default: 2)")
    parser.add_argument("--random", type=int, default=8, help="Dirichlet draws for random_best (default: 8)")
    parser.add_argument("--random-steps", type=int, default=100, help="steps of each random-draw proxy (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Dirichlet draws (default: 0)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. data=shards data.path=…)")
    args = parser.parse_args(argv)
    try:
        study(Path(args.out), [c for c in args.conditions.split(",") if c], [int(s) for s in args.seeds.split(",")],
              args.jobs, args.random, args.random_steps, args.seed, args.overrides)
    except StudyError as e:
        print(f"mixtrain study: {e}", file=sys.stderr)
        return 1
    return 0
