"""Building a run from its config, before any step.

:func:`prepare` (nothing written, no engine): the data, the model resolved against it, the
controller, the sampler's pools and order, the fingerprint a resume must match. :func:`start`
(the run directory locked): the checkpoint to continue from (``trainer.resume``), the engine, the
tracker and the registered callbacks (the online curriculum, DoReMi's reference model, …), the
restored state; then the first
writes. Bad input is refused before the run directory is touched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mixtures import build_controller

from . import callbacks, checkpoint, dist, engines, resume, rundir, warm_start
from . import throughput as _throughput  # noqa: F401  (registers the MFU / memory meter)
from .config import Config, ConfigError
from .console import say
from .curriculum import online as _online  # noqa: F401  (registers the online curriculum's callback)
from .curriculum.holdout import config_pools
from .data.domains import DataBundle, check_vocab, load_data, shard_fingerprint
from .data.reference import reference_slice, uses_heldout, without
from .data.sampler import DomainSampler, SampleOrder
from .signals import evaluation_overlap, expand_references
from .tracking import Tracker
from .train_state import ShardCursor
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


def with_global_batch(cfg: Config, dp_size: int) -> Config:
    """``cfg`` with train.grad_accum derived from train.global_batch on ``dp_size`` data-parallel
    ranks (unchanged when train.global_batch is 0)."""
    t = cfg.train
    if not t.global_batch:
        return cfg
    per_pass = t.micro_batch * dp_size
    if t.global_batch % per_pass:
        fits = [m for m in range(1, t.global_batch // dp_size + 1) if t.global_batch % (m * dp_size) == 0]
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch={t.micro_batch} x "
            f"{dp_size} data-parallel rank(s); train.micro_batch allowed here: {fits}"
        )
    accum = t.global_batch // per_pass
    if t.grad_accum not in (1, accum):
        raise ConfigError(
            f"train.grad_accum={t.grad_accum} conflicts with train.global_batch={t.global_batch} (which makes it "
            f"{accum} on {dp_size} data-parallel rank(s)); leave train.grad_accum unset"
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=accum))


def fingerprint(cfg: Config, world: int, data: DataBundle, scores_meta: dict | None) -> dict:
    """What a checkpoint must agree with to be resumed: the knobs, the world size, the domains,
    the tokenizer and the shard set's own fingerprint (the data itself)."""
    t = cfg.train
    out = {
        **cfg.fingerprint(),
        "world_size": world,
        "global_batch": t.micro_batch * t.grad_accum * world // cfg.engine.tensor_parallel,
        "domains": data.domains,
        "tokenizer": data.tokenizer,
        "shards": shard_fingerprint(data),
    }
    if data.reference is not None:
        out["data"]["reference_fraction"] = cfg.data.reference_fraction
    if scores_meta is not None:  # the scores' content, not just their path, must match on resume
        out["curriculum_scores_key"] = scores_meta["key"]
    return out


@dataclass
class Prepared:
    """What a run is made of before anything is written or an engine built (``prepare``)."""

    cfg: Config = None
    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    run_dir: Path = None
    data: DataBundle = None
    K: int = 0
    global_batch: int = 0
    controller: object = None
    steers_on_eval: list = field(default_factory=list)
    scores_meta: dict | None = None
    cursor: ShardCursor = None
    fingerprint: dict = field(default_factory=dict)
    ckpt_root: Path = None


def prepare(cfg: Config) -> Prepared:
    """Collective: join the process group, open the data (rank 0 builds the demo corpus if needed),
    resolve the model against it, build the controller and the sampler, and compute the
    fingerprint. Every refusal of the input happens here or in :func:`start` before it writes."""
    p = Prepared()
    p.rank, p.world, _ = dist.init(cfg.engine.backend)
    p.dp_rank, p.dp_size = dist.data_parallel(p.rank, p.world, cfg.engine.tensor_parallel)
    p.run_dir = Path(dist.broadcast_object(cfg.run.dir or f"runs/{cfg.run.name}"))
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(p.run_dir)))
    # Rank 0 builds the demo corpus if needed; the others open it once it exists.
    if p.rank == 0:
        p.data = load_data(cfg.data)
    dist.barrier()
    if p.rank != 0:
        p.data = load_data(cfg.data, quiet=True)
    p.cfg = cfg = resolve_model(cfg, p.data)
    p.K = len(p.data.domains)
    p.cfg = cfg = with_global_batch(cfg, p.dp_size)
    t = cfg.train
    p.global_batch = t.micro_batch * t.grad_accum * p.dp_size
    p.controller = controller(cfg, p.data, p.global_batch)
    drawn = config_pools(cfg, p.data, cfg.data.subset)
    if uses_heldout(p.controller.references):
        # steering data the sampler never draws: a slice of every domain's training samples
        p.data.reference = [
            reference_slice(d, int(n), cfg.data.reference_fraction)
            for d, n in zip(p.data.domains, p.data.train_samples)
        ]
        drawn = without(drawn, p.data.train_samples, p.data.reference)
    p.steers_on_eval = evaluation_overlap(expand_references(p.controller.references, p.data), p.data)
    if p.steers_on_eval:
        say(
            p.rank,
            "warning: the mixture steers on data that evaluation reports: " + "; ".join(p.steers_on_eval),
        )
    order, p.scores_meta = curriculum_order(cfg, p.data, drawn)
    sampler = DomainSampler(
        p.data.train_samples,
        cfg.data.steps_per_shard * p.global_batch,
        seed=t.seed,
        exhaustion=cfg.data.exhaustion,
        pools=drawn,
        order=order,
        names=p.data.domains,
    )
    p.cursor = ShardCursor(sampler)
    p.fingerprint = fingerprint(cfg, p.world, p.data, p.scores_meta)
    p.ckpt_root = p.run_dir / "checkpoints"
    if t.fail_rank >= p.world:
        raise ConfigError(f"train.fail_rank={t.fail_rank} names no rank of this {p.world}-rank job")
    return p


def start(loop) -> None:
    """Collective, with the run directory locked: find and check the checkpoint to continue from,
    build the engine, the tracker and the registered callbacks, restore the
    stateful map, and only then write: the run's config and id, the logs' start."""
    t = loop.cfg.train
    if dist.broadcast_object(loop.run_dir.is_dir()):
        rundir.take_lock(loop.lock, loop.rank)  # before reading checkpoints another job might be writing
    resume_from, loaded = resume.find_resume(t.resume, loop.run_dir, loop.ckpt_root, loop.rank)
    events, init_from = [], None
    if resume_from is not None:
        events = resume.check_resume(resume_from, loaded[0], loop.fingerprint, loop.cfg.engine, loop.rank, t.extend)
    elif t.init_from:
        init_from = warm_start.check(t.init_from, loop.fingerprint)
    kept = checkpoint.run_id(resume_from) if resume_from else None  # None: a fresh run, or one from before run ids
    loop.run_id = dist.broadcast_object(kept or rundir.new_run_id())
    # Nothing is written before this point: bad input never touches an existing run.
    loop.engine = engines.build_engine(loop.cfg)
    loop._signals = None
    loop.tracker = Tracker(
        loop.run_dir,
        loop.cfg.to_dict(),
        enabled=loop.rank == 0,
        wandb=loop.cfg.run,
        run_id=loop.run_id,
        log_every=t.log_every,
        total_steps=t.steps,
    )
    loop.callbacks = [cb for make in callbacks.FACTORIES if (cb := make(loop)) is not None]
    loop.callbacks.append(loop.tracker)  # last: it logs what the others added to a record
    if resume_from is not None:
        resume.restore(loop, resume_from)
        if loop.step > t.steps:
            raise ConfigError(
                f"train.steps={t.steps} is below the checkpoint's step {loop.step}: an extension only lengthens a run"
            )
    if init_from is not None:
        events = [warm_start.load(loop.engine, init_from)]
        say(loop.rank, f"warm start from {init_from}: its model weights; optimizer, mixture and schedule start fresh")
    for event in events:
        loop.state.lineage.append({**event, "at_step": loop.step})
        if event["event"] == "extended":
            say(
                loop.rank,
                f"extending the run from {event['steps_before']} to {event['steps']} steps at step {loop.step}",
            )
    rundir.take_lock(loop.lock, loop.rank)
    if loop.rank == 0:
        if t.resume == "replace" and rundir.step_dirs(loop.ckpt_root):
            aside = rundir.set_aside(loop.run_dir, loop.ckpt_root)
            say(loop.rank, f"train.resume=replace: the earlier run moved to {aside}")
        (loop.run_dir / "config.yaml").write_text(yaml.safe_dump(loop.cfg.to_dict(), sort_keys=False))
        (loop.run_dir / checkpoint.RUN_ID_FILE).write_text(loop.run_id + "\n")
    loop.tracker.open()
