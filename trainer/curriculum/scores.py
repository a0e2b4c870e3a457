"""Per-sample learnability scores: computing them (``mixtrain score``), storing and refusing them.

Score (controllers reference §4.1/§4.2): for every training sample x of every domain,

    s(x) = mean per-token loss of x under the proxy's early checkpoint
         − mean per-token loss of x under its late checkpoint

computed on the sample exactly as the main run feeds it: the same shard set, tokenizer and
``data.seq_len``, the same slicing (``SequenceView``: sample j = tokens [j·L, j·L + L], L loss
tokens). Every sample has the same number of loss tokens, so the mean is the length-normalised
form of §4.2 and scores are comparable inside a domain. The early checkpoint plays the main
model's current loss, the late one the irreducible-loss model. Holdout samples are scored too (the
proxy trained on them, so their scores are optimistic; harmless, the main run never draws them).

Storage: ``<out>/<domain>.npy`` (float32, one score per sample index of the domain's training
split) and ``<out>/meta.json``. The default ``<out>`` is ``PROXY_RUN/scores/<key>/`` where the key
is a hash of (shard set manifest, tokenizer identity, seq_len, per-domain sample counts, and the two
checkpoints' step and content hash). A run with ``curriculum.scores`` recomputes its own data
identity and refuses scores whose identity differs, naming what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..config import ConfigError, config_hash
from ..data.tokenizer import identity_difference

FORMAT = "mixtrain-scores/1"
META = "meta.json"


# ---- identity ---------------------------------------------------------------------------------
def shards_identity(data) -> str:
    """A hash naming the shard set: its manifest.json's bytes, or (bare prefixes) the prefixes and
    their token counts."""
    if data.root:
        return hashlib.sha256((Path(data.root) / "manifest.json").read_bytes()).hexdigest()[:16]
    return config_hash({d: [v.stream.prefix, int(v.stream.num_tokens)] for d, v in zip(data.domains, data.train)})


def data_identity(data, seq_len: int) -> dict:
    """What scores must agree with to be used: shards, tokenizer, seq_len, samples per domain."""
    return {
        "shards": shards_identity(data),
        "tokenizer": data.tokenizer,
        "seq_len": int(seq_len),
        "samples": {d: len(v) for d, v in zip(data.domains, data.train)},
    }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def scores_key(identity: dict, early: dict, late: dict) -> str:
    return config_hash(
        {
            "data": identity,
            "early": {k: early[k] for k in ("step", "sha256")},
            "late": {k: late[k] for k in ("step", "sha256")},
        }
    )


# ---- computing --------------------------------------------------------------------------------
def _pick_checkpoint(ckpts: list[Path], spec: str, steps: int, which: str) -> Path:
    """A checkpoint by step (an integer) or by fraction of the proxy's train.steps (a number with a
    decimal point, in (0, 1]: the nearest checkpoint, within 5% of the steps)."""
    by_step = {int(p.name.split("_")[1]): p for p in ckpts}
    avail = ", ".join(map(str, sorted(by_step)))
    try:
        if "." in spec or "e" in spec.lower():
            frac = float(spec)
            if not 0.0 < frac <= 1.0:
                raise ValueError
            target = frac * steps
            step = min(sorted(by_step), key=lambda s: abs(s - target))
            if abs(step - target) > 0.05 * steps + 1:
                raise ConfigError(
                    f"--{which} {spec}: no checkpoint near step {target:.0f} of the proxy's {steps} "
                    f"(available: {avail}); train the proxy with +experiment=curriculum_proxy (keeps one "
                    f"every 10%) or pass a step"
                )
            return by_step[step]
        step = int(spec)
    except ConfigError:
        raise  # a ValueError too: the reason above, not the generic one below
    except ValueError:
        raise ConfigError(
            f"--{which} {spec!r}: give a checkpoint step (e.g. 20) or a fraction of the proxy's steps (e.g. 0.1)"
        ) from None
    if step not in by_step:
        raise ConfigError(f"--{which} {step}: no complete checkpoint at that step (available: {avail})")
    return by_step[step]


def score_run(
    run: str | os.PathLike,
    early: str = "0.1",
    late: str = "1.0",
    batch: int = 64,
    out: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Score every training sample of the proxy run's domains; returns the scores directory."""
    import dataclasses

    import torch
    import yaml
    from tqdm import tqdm

    from .. import checkpoint
    from ..config import load_config
    from ..data.domains import load_data
    from ..engines import load_frozen
    from ..models import frozen_token_losses

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"PROXY_RUN={str(run)!r} is not a mixtrain run directory (no config.yaml)")
    cfg = load_config(yaml.safe_load((run / "config.yaml").read_text()))
    ckpts = checkpoint.complete_checkpoints(run / "checkpoints")
    if len(ckpts) < 2:
        raise ConfigError(
            f"PROXY_RUN={str(run)!r} holds {len(ckpts)} complete checkpoint(s); scoring needs an early and a late one "
            "(train it with +experiment=curriculum_proxy, which keeps one every 10% of the steps)"
        )
    early_ckpt = _pick_checkpoint(ckpts, str(early), cfg.train.steps, "early")
    late_ckpt = _pick_checkpoint(ckpts, str(late), cfg.train.steps, "late")
    if early_ckpt.name >= late_ckpt.name:
        raise ConfigError(f"--early ({early_ckpt.name}) must come before --late ({late_ckpt.name})")
    if batch <= 0:
        raise ConfigError(f"--batch {batch} must be positive")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")

    data = load_data(dataclasses.replace(cfg.data, subset="all"), quiet=True)
    identity = data_identity(data, cfg.data.seq_len)
    ids = {}
    for which, ck in (("early", early_ckpt), ("late", late_ckpt)):
        ids[which] = {
            "step": int(ck.name.split("_")[1]),
            "sha256": file_sha256(ck / "state.pt"),
            "path": str(ck.resolve()),
        }
    key = scores_key(identity, ids["early"], ids["late"])
    dest = Path(out) if out else run / "scores" / key
    models = {w: load_frozen(cfg.model, ck, dev) for w, ck in (("early", early_ckpt), ("late", late_ckpt))}

    total = int(sum(len(v) for v in data.train))
    print(
        f"[mixtrain] scoring {total} samples of {len(data.domains)} domains (seq_len {cfg.data.seq_len}) on {dev}: "
        f"early = {early_ckpt.name}, late = {late_ckpt.name}",
        flush=True,
    )
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bar = tqdm(
        total=total,
        desc="score",
        unit="sample",
        dynamic_ncols=True,
        file=sys.stdout,
        disable=not progress,
        mininterval=0.1 if sys.stdout.isatty() else 15,
    )
    summary = {}
    with torch.no_grad():
        for d, view in zip(data.domains, data.train):
            n = len(view)
            scores = np.empty(n, dtype=np.float32)
            for s in range(0, n, batch):
                idx = np.arange(s, min(n, s + batch))
                toks = torch.from_numpy(view.get(idx)).to(dev)
                a = frozen_token_losses(models["early"], toks).double().mean(dim=1)
                b = frozen_token_losses(models["late"], toks).double().mean(dim=1)
                scores[s : s + idx.size] = (a - b).cpu().numpy().astype(np.float32)
                bar.update(idx.size)
            np.save(tmp / f"{d}.npy", scores)
            summary[d] = {"mean": float(scores.mean()), "std": float(scores.std()), "samples": n}
    bar.close()
    meta = {
        "format": FORMAT,
        "key": key,
        "data": identity,
        "early": ids["early"],
        "late": ids["late"],
        "score": "mean token loss(early) - mean token loss(late) per sample",
        "proxy": {
            "run": str(run.resolve()),
            "steps": cfg.train.steps,
            "model": dataclasses.asdict(cfg.model),
            "holdout_fraction": cfg.data.holdout_fraction,
            "subset": cfg.data.subset,
        },
        "domains": list(data.domains),
        "summary": summary,
        "created": time.time(),
    }
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    lines = [
        f"  {d:<14} mean {v['mean']:+.4f}  std {v['std']:.4f}  ({v['samples']} samples)" for d, v in summary.items()
    ]
    print("[mixtrain] learnability per domain (early - late mean token loss):\n" + "\n".join(lines), flush=True)
    print(
        f"[mixtrain] scores: {dest.resolve()}\n[mixtrain] use with: mixtrain train curriculum=irreducible "
        f"curriculum.scores={dest.resolve()} "
        f"mixture=<any> (same data and data.seq_len={cfg.data.seq_len})",
        flush=True,
    )
    return dest


# ---- using ------------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict | None:
    f = path / META
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return meta if meta.get("format") == FORMAT else None


def _differences(meta: dict, identity: dict, domains: list[str]) -> list[str]:
    """What differs between the scores' data identity and this run's (empty = usable)."""
    have = meta.get("data", {})
    out = []
    if have.get("seq_len") != identity["seq_len"]:
        out.append(f"data.seq_len: scores {have.get('seq_len')} vs this run {identity['seq_len']}")
    differs = identity_difference(have.get("tokenizer") or {}, identity["tokenizer"])
    if differs:
        out.append(f"tokenizer: scores {differs} (this run)")
    if have.get("shards") != identity["shards"]:
        out.append(
            f"shard set: scores manifest {have.get('shards')} vs this run {identity['shards']} (data.path / "
            "data.source)"
        )
    samples = have.get("samples", {})
    for d in domains:
        if d not in samples:
            out.append(f"domain {d!r}: not scored (scored: {sorted(samples)})")
        elif samples[d] != identity["samples"][d]:
            out.append(
                f"domain {d!r}: scores hold {samples[d]} samples, this run's domain has {identity['samples'][d]}"
            )
    return out


def resolve_scores(path: str, data, seq_len: int) -> tuple[Path, dict]:
    """The scores directory ``curriculum.scores`` names (a scores dir, or a proxy run holding one
    matching this run's data) and its meta; ConfigError naming the knob and what differs otherwise."""
    p = Path(path)
    identity = data_identity(data, seq_len)
    knob = f"curriculum.scores={path!r}"
    if not p.exists():
        raise ConfigError(f"{knob} does not exist")
    meta = _read_meta(p)
    if meta is None:
        candidates = (
            [
                (c, m)
                for c in sorted((p / "scores").iterdir())
                if c.is_dir() and not c.name.endswith(".tmp")
                for m in [_read_meta(c)]
                if m is not None
            ]
            if (p / "scores").is_dir()
            else []
        )
        if not candidates:
            raise ConfigError(
                f"{knob} is neither a scores directory nor a proxy run with scores; run `mixtrain score {path}` first"
            )
        matching = [(c, m) for c, m in candidates if not _differences(m, identity, data.domains)]
        if len(matching) > 1:
            raise ConfigError(
                f"{knob} holds {len(matching)} scores matching this run's data "
                f"({', '.join(c.name for c, _ in matching)}); name one: curriculum.scores={p}/scores/<key>"
            )
        if not matching:
            c, m = candidates[-1]
            raise ConfigError(
                f"{knob}: no scores under {p / 'scores'} match this run's data; {c.name} differs in:\n  "
                + "\n  ".join(_differences(m, identity, data.domains))
            )
        p, meta = matching[0]
    recorded = (
        scores_key(meta.get("data", {}), meta.get("early", {}), meta.get("late", {}))
        if "early" in meta and "late" in meta
        else None
    )
    if recorded != meta.get("key"):
        raise ConfigError(
            f"{knob}: meta.json's key {meta.get('key')} does not match its contents (edited or corrupt); rescore"
        )
    diffs = _differences(meta, identity, data.domains)
    if diffs:
        raise ConfigError(
            f"{knob} was computed for different data (key {meta['key']}); refusing it. Differences:\n  "
            + "\n  ".join(diffs)
        )
    return p, meta


def load_scores(path: str, data, seq_len: int, holdout_fraction: float) -> tuple[list[np.ndarray], dict]:
    """Per-domain float32 score arrays (aligned with each domain's sample index) and the meta."""
    p, meta = resolve_scores(path, data, seq_len)
    proxy = meta.get("proxy", {})
    if proxy.get("subset") != "holdout":
        raise ConfigError(
            f"curriculum.scores={path!r} come from a proxy trained with "
            f"data.subset={proxy.get('subset')!r}, i.e. on the main run's own samples, so they would "
            "rank samples the proxy memorised; train the proxy on the holdout (mixtrain train "
            "+experiment=curriculum_proxy sets data.subset=holdout) and score that run"
        )
    if proxy.get("holdout_fraction") != holdout_fraction:
        raise ConfigError(
            f"data.holdout_fraction={holdout_fraction}, but the proxy behind curriculum.scores={path!r} trained on "
            f"a holdout of {proxy.get('holdout_fraction')}: the main run would train on the proxy's samples; "
            f"set data.holdout_fraction={proxy.get('holdout_fraction')}"
        )
    arrays = []
    for d, view in zip(data.domains, data.train):
        f = p / f"{d}.npy"
        if not f.is_file():
            raise ConfigError(f"curriculum.scores={path!r}: {f.name} is missing")
        a = np.load(f)
        if a.ndim != 1 or a.size != len(view):
            raise ConfigError(
                f"curriculum.scores={path!r}: {f.name} holds {a.size} scores, domain {d!r} has {len(view)} samples"
            )
        arrays.append(a)
    return arrays, {**meta, "dir": str(p)}


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtrain score",
        description="Per-sample learnability for the irreducible curriculum: mean token loss under the proxy's early "
        "checkpoint minus under its late one, for every training sample of every domain, sliced exactly as "
        "training slices it. Writes <domain>.npy (float32, by sample index) and meta.json; prints the directory.",
        epilog="Then: mixtrain train curriculum=irreducible curriculum.scores=PROXY_RUN mixture=<any>",
    )
    parser.add_argument(
        "run",
        metavar="PROXY_RUN",
        help="a run of `mixtrain train +experiment=curriculum_proxy` (or any run "
        "with checkpoints near 10%% and 100%% of its steps)",
    )
    parser.add_argument(
        "--early",
        default="0.1",
        help="early checkpoint: a step (e.g. 20) or a fraction of the proxy's "
        "train.steps (default 0.1 = the 10%% checkpoint)",
    )
    parser.add_argument(
        "--late", default="1.0", help="late checkpoint, same forms (default 1.0 = the final checkpoint)"
    )
    parser.add_argument("--batch", type=int, default=64, help="sequences per forward pass (default 64)")
    parser.add_argument("--out", default=None, help="output directory (default PROXY_RUN/scores/<key>)")
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str]) -> Path:
    args = build_parser().parse_args(argv)
    from ..refusal import refusals, refuse

    try:
        return score_run(
            args.run, args.early, args.late, args.batch, args.out, args.device, progress=not args.no_progress
        )
    except refusals() as e:
        refuse(e, "mixtrain score")
