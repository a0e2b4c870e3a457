"""Which checkpoint a run continues from, whether it may, and saving the run's state.

``train.resume``: ``auto`` takes the newest readable checkpoint of this run directory's run
(``trainer.rundir``), ``never`` refuses a directory holding checkpoints, ``replace`` moves them
aside, a path names one. A checkpoint of another engine layout or configuration is refused,
naming what differs. What is saved and restored is the loop's stateful map (``Loop.states``)
beside the engine's own part (``trainer.checkpoint``).
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint, engines, rundir
from .config import ConfigError
from .console import say
from .train_state import upgrade


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


RANK_LAYOUT = ("world_size", "train.micro_batch", "train.grad_accum")
"""Fingerprint entries that may change at resume while the global batch stays (elastic restart)."""


def saved_global_batch(fp: dict, meta: dict) -> int | None:
    """The global batch a checkpoint was written with (older ones record its factors only)."""
    if "global_batch" in fp:
        return fp["global_batch"]
    t, tp = fp.get("train", {}), (meta.get("engine") or {}).get("tensor_parallel", 1)
    if not {"micro_batch", "grad_accum"} <= set(t) or "world_size" not in fp:
        return None
    return t["micro_batch"] * t["grad_accum"] * fp["world_size"] // tp


MAY_CHANGE = (
    "what may change on resume: train.steps with train.extend=true; the number of ranks with train.global_batch "
    "kept; train.eval_every/log_every/checkpoint_every/keep_checkpoints and run.*. To take this run's weights "
    "under other knobs (a new mixture, schedule or batch), start a new run with train.init_from=<its run dir>"
)


def check_resume(path: Path, meta: dict, now: dict, engine_cfg, rank: int = 0, extend: bool = False) -> list[dict]:
    """Refuse a checkpoint of another engine layout or configuration, naming what differs; the
    lineage records of the changes allowed. Another rank count with the same global batch is an
    elastic restart, allowed where the engine reshards; another train.steps is an extension, allowed
    with ``extend`` (train.extend)."""
    engines.check_engine_format(path, meta.get("engine"), engines.checkpoint_format(engine_cfg))
    saved = dict(meta.get("fingerprint", {}))
    if "shards" not in saved:  # written before shard fingerprints
        now = {k: v for k, v in now.items() if k != "shards"}
    if "global_batch" not in saved:  # written before train.global_batch
        saved["global_batch"] = saved_global_batch(saved, meta)
    diffs = checkpoint.diff_fingerprints(saved, now)  # "shards": the data itself changed (re-ingested, …)
    layout = [d for d in diffs if d.split(":")[0] in RANK_LAYOUT]
    events, hint = [], ""
    steps = [d for d in diffs if d.startswith("train.steps:")]
    if steps and extend:
        diffs.remove(steps[0])
        events.append({"event": "extended", "steps_before": saved["train"]["steps"], "steps": now["train"]["steps"]})
    if layout and saved["global_batch"] == now["global_batch"]:
        why = engines.engine_class(engine_cfg.name).reshard_refusal
        if why is None or saved.get("world_size") == now["world_size"]:
            diffs = [d for d in diffs if d not in layout]
            if saved.get("world_size") != now["world_size"]:
                events.append({"event": "elastic", "ranks_before": saved.get("world_size"), "ranks": now["world_size"]})
                t = now["train"]
                say(
                    rank,
                    f"elastic restart: checkpoint of {saved.get('world_size')} rank(s) resumed on {now['world_size']}; "
                    f"global batch {now['global_batch']} kept (micro-batch {t['micro_batch']} x accumulation "
                    f"{t['grad_accum']} per rank now)",
                )
        else:
            hint = f"\nengine={engine_cfg.name} cannot resume on another rank count: {why}"
    elif any(d.startswith("world_size:") for d in layout):
        hint = (
            f"\nanother rank count needs the same global batch (checkpoint {saved['global_batch']}, now "
            f"{now['global_batch']}): set train.global_batch={saved['global_batch']}"
        )
    if diffs:
        raise checkpoint.CheckpointMismatch(
            f"checkpoint {path} was written with a different configuration; differing knobs:\n  "
            + "\n  ".join(diffs)
            + hint
            + f"\n{MAY_CHANGE}; or use train.resume=replace (moves the old run aside) or another run.dir to start fresh"
        )
    return events


def restore(loop, path: Path) -> None:
    """Hand every part of ``loop.states`` and the engine its state from ``path``."""
    checkpoint.restore(path, loop.states, engine=loop.engine, rank=loop.rank, upgrade=upgrade)
    say(loop.rank, f"resumed from {path} at step {loop.step}")


def save(loop) -> Path:
    """Collective: one checkpoint of the loop's stateful map and its engine at ``loop.step``; the
    callbacks' ``on_save`` runs inside it, before the rename that completes it."""
    meta = {"fingerprint": loop.fingerprint, "run_id": loop.run_id}
    engine_format = engines.checkpoint_format(loop.cfg.engine)
    if engine_format is not None:
        meta["engine"] = engine_format

    def before_commit(tmp: Path) -> None:
        for cb in loop.callbacks:
            cb.on_save(loop, tmp)

    return checkpoint.save(
        loop.ckpt_root,
        loop.step,
        loop.states,
        meta,
        loop.cfg.train.keep_checkpoints,
        engine=loop.engine,
        before_commit=before_commit,
    )
