"""One job per run directory, one run per checkpoint set.

**The lock.** Rank 0 holds an exclusive ``flock`` on ``<run.dir>/.lock`` for the job's life, so a
second job on the same directory (a relaunch while torchrun's orphaned workers still train, two
sweeps given one ``run.dir``) fails at once, naming the host, pid and start time of the job that
holds it. The kernel drops a ``flock`` when its process dies, so a lock file left by a killed job
is taken over, with a warning that names the dead holder. Inside one process the lock is
re-entrant (tests and benchmarks build several loops on one directory).

**The run id.** A run started from step 0 draws an id; every checkpoint (``meta.json``), metrics
record and ``weights.json`` carries it, and a resume keeps it. Checkpoints of another id in the
same folder are never pruned nor loaded: they belong to another run.

**Choosing the checkpoint.** :func:`resume_candidate` walks the checkpoints newest first and takes
the newest one that reads completely (``meta.json`` parses, the payload loads, every rank's RNG
file loads), warning about each damaged one it passes over; a directory that holds checkpoints but
none readable is refused, never silently restarted from step 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from . import checkpoint, dist, engines, safe_load
from .checkpoint import DamagedCheckpoint
from .config import ConfigError
from .console import say

LOCK_NAME = ".lock"


class RunDirBusy(ConfigError):
    """Another live job holds the run directory."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class RunLock:
    _held: dict[str, list] = {}  # resolved path -> [file object, holders in this process]

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir).resolve() / LOCK_NAME
        self.taken = False
        self.created = False  # whether acquire() made the directory (a refused launch then removes it)

    def acquire(self) -> str | None:
        """Take the lock (creating the directory); returns a warning when a dead job's lock was taken over."""
        key = str(self.path)
        if key in self._held:
            self._held[key][1] += 1
            self.taken = True
            return None
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(self.path))
            f.close()
            raise RunDirBusy(
                f"run.dir={str(self.path.parent)!r} is in use by another job ({holder}); wait for it to "
                "end or stop it, or give this job another run.dir"
            ) from None
        previous = _read(self.path)
        f.seek(0)
        f.truncate()
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        f.flush()
        self._held[key] = [f, 1]
        self.taken = True
        if previous:
            return (
                f"took over the lock {self.path} left by a job that ended without releasing it ({_describe(previous)})"
            )
        return None

    def release(self) -> None:
        if not self.taken:
            return
        self.taken = False
        key = str(self.path)
        entry = self._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            entry[0].seek(0)
            entry[0].truncate()  # a clean exit leaves no holder to report
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            entry[0].close()
            if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
                shutil.rmtree(self.path.parent)  # this launch made the folder and wrote nothing else


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


# ---- which checkpoint a run continues from ----------------------------------------------------------


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Every checkpoint directory under its final name (``step_XXXXXXXX``), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if p.is_dir() and checkpoint.is_step_dir(p)), key=lambda p: p.name)


def read(path: Path, rank: int) -> tuple[dict, dict | None]:
    """(meta, this rank's RNG state or None) after checking every file a restart reads (meta.json,
    the engine format's payload, every rank's RNG file, so that all ranks judge alike); any failure
    is a DamagedCheckpoint saying why."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DamagedCheckpoint("no meta.json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"meta.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not meta.get("complete"):
        raise DamagedCheckpoint("meta.json does not mark it complete")
    try:
        engines.format_of(meta).vet_checkpoint(path, meta)
        for rng in path.glob("rng_rank*.pt"):
            safe_load.load(rng)
        rng_path = path / f"rng_rank{rank}.pt"
        return meta, safe_load.load(rng_path) if rng_path.is_file() else None
    except DamagedCheckpoint:
        raise
    except Exception as e:  # a truncated zip, an unsafe pickle, an I/O error: every way a load fails
        raise DamagedCheckpoint(f"{type(e).__name__}: {e}") from None


def resume_candidate(ckpt_root: Path, rank: int) -> tuple[Path | None, tuple | None, list[str]]:
    """(the newest checkpoint of this run directory's run that reads, what :func:`read` returned for
    it, warnings about damaged and foreign ones passed over); (None, None, []) when there are no
    checkpoints. Raises ConfigError when checkpoints exist but none reads: a run is never silently
    restarted from step 0."""
    damaged, warnings = [], []
    dirs = step_dirs(ckpt_root)
    mine = checkpoint.owner(ckpt_root)
    if mine is not None:
        foreign = [p for p in dirs if checkpoint.run_id(p) not in (mine, None)]
        if foreign:
            warnings.append(
                f"ignoring {len(foreign)} checkpoint(s) of other runs in {ckpt_root} (this run is {mine}; "
                f"theirs: {sorted({checkpoint.run_id(p) for p in foreign})}): never loaded nor pruned"
            )
        dirs = [p for p in dirs if p not in foreign]
    for path in reversed(dirs):
        try:
            loaded = read(path, rank)
        except DamagedCheckpoint as e:
            damaged.append(f"{path}: {e}")
            continue
        return path, loaded, warnings + [f"skipping damaged checkpoint {d}" for d in damaged]
    if dirs:
        raise ConfigError(
            f"no readable checkpoint in {ckpt_root} (damaged: " + "; ".join(damaged) + "); "
            "nothing was changed. Restore a good checkpoint, or start this run over with "
            "train.resume=replace (moves the old checkpoints aside)"
        )
    return None, None, []


def set_aside(run_dir: Path, ckpt_root: Path) -> Path:
    """train.resume=replace: move the old run's checkpoints and logs into ``<run.dir>/replaced-<time>``."""
    dest = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True)
    for name in (
        ckpt_root.name,
        checkpoint.RUN_ID_FILE,
        "metrics.jsonl",
        "weights.jsonl",
        "weights.json",
        "eval_sequences.npz",
        "wandb_id.txt",
    ):
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(dest / name))
    return dest


def take_lock(lock: RunLock | None, rank: int) -> None:
    """Collective: rank 0 takes the run dir's lock (creating the directory); every rank fails alike
    when another job holds it."""
    refused = None
    if lock is not None and not lock.taken:
        try:
            warning = lock.acquire()
            if warning:
                say(rank, "warning: " + warning)
        except RunDirBusy as e:
            refused = str(e)
    refused = dist.broadcast_object(refused)
    if refused:
        raise RunDirBusy(refused)
