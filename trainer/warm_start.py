"""``train.init_from``: a run that starts from another run's model weights, and nothing else of it
(optimizer, mixture, data order, schedule and step counter start fresh)."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint, engines
from .config import ConfigError


def source(spec: str) -> Path:
    """The checkpoint ``train.init_from`` names: a checkpoint directory, or a run directory's newest
    complete checkpoint."""
    path = Path(spec)
    if (path / "meta.json").is_file():
        return path
    newest = checkpoint.latest(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if newest is None:
        raise ConfigError(
            f"train.init_from={spec!r} is neither a checkpoint directory (holding meta.json) nor a run directory "
            "with a complete checkpoint under checkpoints/"
        )
    return newest


def check(spec: str, fingerprint: dict) -> Path:
    """The source checkpoint, refused unless it holds our model's weights and its model and tokenizer
    are this run's (the knobs that differ named): weights of another shape or vocabulary cannot be loaded."""
    path = source(spec)
    meta = checkpoint.load_meta(path)
    names = engines.format_of(meta).weight_names
    if names != "mixtrain":
        raise ConfigError(
            f"train.init_from={spec!r}: {path} holds {names}'s model (engine={meta['engine']['name']}), which "
            "mixtrain's models do not load; start from a checkpoint of engine torch, fsdp or deepspeed"
        )
    saved = meta.get("fingerprint", {})
    keys = ("model", "tokenizer")
    diffs = checkpoint.diff_fingerprints({k: saved.get(k) for k in keys}, {k: fingerprint[k] for k in keys})
    if diffs:
        raise ConfigError(
            f"train.init_from={spec!r}: {path} holds another model; differing knobs: {'; '.join(diffs)} "
            "(set them to the checkpoint's)"
        )
    return path


def load(engine, path: Path) -> dict:
    """Load the model weights of ``path`` into ``engine``; the lineage record of the warm start."""
    state, meta, _ = engines.read_checkpoint(path)
    engine.load_model_weights(state["engine"]["model"])
    return {
        "event": "init_from",
        "checkpoint": str(path),
        "run_id": meta.get("run_id"),
        "its_step": int((state.get("loop") or {}).get("step", -1)),
    }
