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
