"""Building a run from its config, before any step: the model resolved against the data, the
controller, the sampler's pools and order, the fingerprint a resume must match, and which
checkpoint (if any) the run continues from.

Nothing here writes: bad input is refused before the run directory is touched.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from mixtures import build_controller

from . import checkpoint, engines, rundir
from .config import Config, ConfigError
from .console import say
from .data.domains import DataBundle, check_vocab, shard_fingerprint
from .data.sampler import SampleOrder
from .weights_io import read_weights


def resolve_model(cfg: Config, data: DataBundle) -> Config:
    """Fill model.vocab_size from the data and check the data fits the model."""
    model = cfg.model
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=int(math.ceil(data.vocab_size / 64) * 64))
    check_vocab(data, model.vocab_size)
    if cfg.data.seq_len > model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's context model.max_seq_len={model.max_seq_len}"
        )
    return dataclasses.replace(cfg, model=model)


def controller(cfg: Config, data: DataBundle, global_batch: int):
    values = dict(cfg.mixture)
    name = values.pop("name")
    if values.get("weights_from"):
        if values.get("weights") is not None:
            raise ConfigError("give mixture.weights or mixture.weights_from, not both")
        values["weights"] = read_weights(values["weights_from"])
    run_tokens = cfg.train.steps * global_batch * cfg.data.seq_len
    return build_controller(name, data.domains, values, domain_tokens=data.train_tokens, run_tokens=run_tokens)


def pools(cfg: Config, data: DataBundle, subset: str):
    from .curriculum.holdout import subset_pools

    try:
        return subset_pools(data.domains, data.train_samples, cfg.data.holdout_fraction, subset)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def curriculum_order(cfg: Config, data: DataBundle, pools) -> tuple[SampleOrder | None, dict | None]:
    """The sampler's within-domain order for ``curriculum.name`` (and the scores' meta, if any).
    Scores that do not match this run's data are refused here, before anything is written."""
    c = cfg.curriculum
    if c.name == "none":
        return None, None
    full = pools or [np.arange(n, dtype=np.int64) for n in data.train_samples]
    if c.name == "irreducible":
        from .curriculum.pacing import ScoreOrder
        from .curriculum.scores import load_scores

        scores, meta = load_scores(c.scores, data, cfg.data.seq_len, cfg.data.holdout_fraction)
        order = ScoreOrder(
            scores,
            full,
            seed=cfg.train.seed,
            steps_per_shard=cfg.data.steps_per_shard,
            total_steps=cfg.train.steps,
            f0=c.f0,
            u_full=c.u_full,
            order=c.order,
        )
        return order, meta
    from .curriculum.pacing import OnlineOrder

    return OnlineOrder(full, seed=cfg.train.seed, pool_factor=c.pool_factor), None


def fingerprint(cfg: Config, world: int, data: DataBundle, scores_meta: dict | None) -> dict:
    """What a checkpoint must agree with to be resumed: the knobs, the world size, the domains,
    the tokenizer and the shard set's own fingerprint (the data itself)."""
    out = {
        **cfg.fingerprint(),
        "world_size": world,
        "domains": data.domains,
        "tokenizer": data.tokenizer,
        "shards": shard_fingerprint(data),
    }
    if data.reference is not None:
        out["data"]["reference_fraction"] = cfg.data.reference_fraction
    if scores_meta is not None:  # the scores' content, not just their path, must match on resume
        out["curriculum_scores_key"] = scores_meta["key"]
    return out


def find_resume(mode: str, run_dir: Path, ckpt_root: Path, rank: int) -> tuple[Path | None, tuple | None]:
    """``train.resume``: the checkpoint to continue from and what reading it gave (meta, rng)."""
    if mode == "replace":
        return None, None
    if mode == "never":
        earlier = rundir.step_dirs(ckpt_root)
        if earlier:
            raise ConfigError(
                f"train.resume=never, but run.dir={str(run_dir)!r} holds checkpoints of an earlier run "
                f"(newest {earlier[-1].name}): continue it with train.resume=auto, start over with "
                f"train.resume=replace (moves them into {run_dir}/replaced-<time>/), or give this run "
                "another run.dir"
            )
        return None, None
    if mode == "auto":
        path, loaded, warnings = rundir.resume_candidate(ckpt_root, rank)
        for w in warnings:
            say(rank, "warning: " + w)
        return path, loaded
    path = Path(mode)
    try:
        return path, rundir.read(path, rank)
    except rundir.DamagedCheckpoint as e:
        raise ConfigError(f"train.resume={mode!r} is not a readable checkpoint: {e}") from None


def check_resume(path: Path, meta: dict, now: dict, engine_cfg) -> None:
    """Refuse a checkpoint of another engine layout or configuration, naming what differs."""
    engines.check_engine_format(path, meta.get("engine"), engines.checkpoint_format(engine_cfg))
    saved = meta.get("fingerprint", {})
    if "shards" not in saved:  # written before shard fingerprints
        now = {k: v for k, v in now.items() if k != "shards"}
    diffs = checkpoint.diff_fingerprints(saved, now)  # "shards": the data itself changed (re-ingested, …)
    if diffs:
        raise checkpoint.CheckpointMismatch(
            f"checkpoint {path} was written with a different configuration; differing knobs:\n  "
            + "\n  ".join(diffs)
            + "\nuse train.resume=replace (moves the old run aside) or another run.dir to start fresh"
        )
