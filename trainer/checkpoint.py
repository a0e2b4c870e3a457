"""One atomic checkpoint of a map of stateful parts; each engine owns the format of its own part.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX``. :func:`save` takes ``{name: stateful}``
(controller, sampler position, loop counters, tracker positions, callbacks: anything with
``state_dict``/``load_state_dict``), collects rank 0's ``state_dict()`` of each and hands them, as
one ``client_state`` mapping, to the engine's ``save_checkpoint``, which writes the model and
optimizer in its own format beside it (the plain layout: one ``state.pt`` holding both; DeepSpeed,
Megatron: their own files, see ``trainer.engines``). Each rank's RNG goes into ``rng_rank<r>.pt``
and ``meta.json`` (the run's fingerprint and id, the engine's format entry, the list of files
written) last. Everything is assembled under ``*.tmp`` and renamed into place, and the ``latest``
pointer replaced after that, so a save interrupted at any point leaves the previous checkpoint the
latest and never a half-written directory under a final name. :func:`restore` hands every part its
state back, in the map's order.

Adding a stateful feature means adding it to the map; this module names no engine and no part.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from . import dist, safe_load

_NAME = re.compile(r"^step_(\d{8})$")
RUN_ID_FILE = "run_id.txt"  # in the run directory: which run's checkpoints are its own
STATE_FILE = "state.pt"  # the client state (and, in the plain layout, the engine's) on rank 0


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class DamagedCheckpoint(Exception):
    """A checkpoint directory that cannot be read completely."""


class CheckpointMismatch(ValueError):
    """A checkpoint written under a different configuration."""


class CheckpointWriteError(RuntimeError):
    """A save that could not complete (the disk is full, …); the previous checkpoint stays the latest."""


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


def _plain_write(directory: Path, client_state: dict | None) -> None:
    """The layout without an engine: rank 0's client state alone in ``state.pt``."""
    if client_state is not None:
        torch.save(client_state, Path(directory) / STATE_FILE)


def save(
    ckpt_root: Path,
    step: int,
    states: Mapping[str, Stateful],
    meta: dict,
    keep: int,
    *,
    engine=None,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank calls it. Rank 0 collects each part's ``state_dict()``; the engine
    (``engine.save_checkpoint(tmp, client_state)``, collective) writes them with its own part; each
    rank writes its RNG. Pruning to the newest ``keep`` touches only checkpoints of this run
    (``meta["run_id"]``). ``before_commit(tmp_dir)`` is called on every rank once its files are
    written, before the rename that completes the checkpoint (fault injection:
    train.fail_in_checkpoint)."""
    rank = dist.env_world()[0] if dist.active() else 0
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"
    previous = latest(ckpt_root)
    client = {name: part.state_dict() for name, part in states.items()} if rank == 0 else None
    write = engine.save_checkpoint if engine is not None else _plain_write
    try:
        return _save(ckpt_root, rank, final, tmp, step, lambda d: write(d, client), meta, keep, before_commit)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(ckpt_root).free < (1 << 20)
        if not full and not isinstance(e, OSError):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # what this save wrote; the previous checkpoint is untouched
        what = "no space left on device" if full else f"{type(e).__name__}: {e}"
        raise CheckpointWriteError(
            f"{what} while writing checkpoint {final}; the previous checkpoint "
            f"{previous or '(none)'} is kept: free space under {ckpt_root} and resume"
        ) from e


def _save(ckpt_root: Path, rank: int, final: Path, tmp: Path, step: int, write, meta, keep, before_commit) -> Path:
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an earlier interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    write(tmp)
    if before_commit is not None:
        before_commit(tmp)
    dist.barrier()
    if rank == 0:
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        _write_json(tmp / "meta.json", {**meta, "step": step, "time": time.time(), "complete": True, "files": files})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        _write_json(ckpt_root / "latest.json", {"step": step, "path": final.name})
        for old in complete_checkpoints(ckpt_root, of_run=meta.get("run_id"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def restore(
    path: Path,
    states: Mapping[str, Stateful],
    *,
    engine=None,
    rank: int = 0,
    upgrade: Callable[[dict], dict] | None = None,
) -> None:
    """Hand every part of ``states`` its saved state, in the map's order (the engine first: it reads
    its own part and returns the client state; collective where the engine's load is). ``upgrade``
    maps an older checkpoint's client state to the current layout. Restores this rank's RNG last."""
    path = Path(path)
    client = engine.load_checkpoint(path) if engine is not None else safe_load.load(path / STATE_FILE)
    if upgrade is not None:
        client = upgrade(client)
    missing = [name for name in states if name not in client]
    if missing:
        raise CheckpointMismatch(
            f"checkpoint {path} holds no state for {', '.join(missing)} (it has: {', '.join(sorted(client))}); "
            "it was written by a run without that part: use train.resume=replace or another run.dir"
        )
    for name, part in states.items():
        part.load_state_dict(client[name])
    rng_path = path / f"rng_rank{rank}.pt"
    if rng_path.is_file():
        set_rng_state(safe_load.load(rng_path))


def is_step_dir(path: Path) -> bool:
    """A checkpoint under its final name (``*.tmp`` is an unfinished save)."""
    return bool(_NAME.match(path.name))


def run_id(path: Path) -> str | None:
    """The id of the run that wrote a checkpoint (None: written before run ids, or unreadable)."""
    try:
        return json.loads((Path(path) / "meta.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def owner(ckpt_root: Path) -> str | None:
    """The id of the run its run directory holds (``<run.dir>/run_id.txt``; None before run ids)."""
    path = Path(ckpt_root).parent / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


def _complete_meta(path: Path) -> dict | None:
    """meta.json of a complete checkpoint: it parses, marks the checkpoint complete, and every file
    it lists is there (a checkpoint from before file lists: some payload beside meta.json and the
    RNG files); None otherwise."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not meta.get("complete"):
        return None
    if "files" in meta:
        return meta if all((path / f).exists() for f in meta["files"]) else None
    return meta if any(p.name != "meta.json" and not p.name.startswith("rng_rank") for p in path.iterdir()) else None


def complete_checkpoints(ckpt_root: Path, of_run: str | None = "owner") -> list[Path]:
    """Complete checkpoints of one run, oldest first (``*.tmp`` and incomplete directories are not):
    by default the run its run directory holds (else the newest checkpoint's run), else the run
    with that id (None: every run's)."""
    if not ckpt_root.is_dir():
        return []
    metas = {p: _complete_meta(p) for p in sorted(ckpt_root.iterdir(), key=lambda p: p.name) if is_step_dir(p)}
    found = {p: m for p, m in metas.items() if m is not None}
    if of_run is None or not found:
        return list(found)
    wanted = (owner(ckpt_root) or list(found.values())[-1].get("run_id")) if of_run == "owner" else of_run
    return [p for p, m in found.items() if m.get("run_id") == wanted]


def latest(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def load_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


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
