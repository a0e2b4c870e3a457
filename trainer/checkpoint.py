"""One atomic checkpoint path for everything a restart needs.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX`` holding ``state.pt`` (model, optimizer,
sampler, controller, loop state: rank 0's), ``rng_rank<r>.pt`` (each rank's RNG) and
``meta.json`` (written last). It is assembled under ``*.tmp`` and renamed into place, and the
``latest`` pointer is replaced atomically after that, so a save interrupted at any point leaves the
previous checkpoint as the latest one and never a half-written directory under a final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from . import dist

_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointMismatch(ValueError):
    """A checkpoint written under a different configuration."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_root: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it. Rank 0 writes the state; each rank writes its RNG."""
    rank = dist.env_world()[0] if dist.active() else 0
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an earlier interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(state, tmp / "state.pt")
    dist.barrier()
    if rank == 0:
        _write_json(tmp / "meta.json", {**meta, "step": step, "time": time.time(), "complete": True})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        _write_json(ckpt_root / "latest.json", {"step": step, "path": final.name})
        for old in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``*.tmp`` and directories without meta.json are not)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if _NAME.match(p.name) and (p / "meta.json").is_file() and (p / "state.pt").is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.name)


def latest(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def load_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load(path: Path, rank: int) -> tuple[dict, dict, dict | None]:
    """(state, meta, this rank's RNG state or None if the checkpoint has none for this rank)."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"train.resume={str(path)!r} is not a complete checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    rng_path = path / f"rng_rank{rank}.pt"
    rng = torch.load(rng_path, weights_only=False) if rng_path.is_file() else None
    return state, meta, rng


def diff_fingerprints(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted knob names whose values differ between two fingerprints."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fingerprints(a, b, name + ".")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{name}: checkpoint {a!r} vs now {b!r}")
    return out
