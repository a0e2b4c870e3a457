"""One atomic checkpoint path for everything a restart needs.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX`` holding ``state.pt`` (model, optimizer,
sampler, controller, loop state: rank 0's), ``rng_rank<r>.pt`` (each rank's RNG) and
``meta.json`` (written last). It is assembled under ``*.tmp`` and renamed into place, and the
``latest`` pointer is replaced atomically after that, so a save interrupted at any point leaves the
previous checkpoint as the latest one and never a half-written directory under a final name.

engine=deepspeed writes its checkpoint with DeepSpeed's own ``save_checkpoint`` instead of
``state.pt``: ``deepspeed/model/`` (every rank's ZeRO partitions; the model-states file carries
the loop's state as DeepSpeed client_state), in the same temporary directory and under the same
rename, and ``meta.json`` records the engine format (``engine``: name, ZeRO stage, precision) that
a resume must match. Torch-engine checkpoints are unchanged (no ``engine`` entry).

engine=megatron writes rank 0's loop state as ``state.pt`` (no ``engine`` key) and one
``megatron/tp_rank_XX.pt`` per tensor-parallel rank (model shard + AdamW state), in the same
temporary directory; ``meta.json``'s ``engine`` entry records ``tensor_parallel``, which a resume
must match.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from . import dist, safe_load

_NAME = re.compile(r"^step_(\d{8})$")
RUN_ID_FILE = "run_id.txt"  # in the run directory: which run's checkpoints are its own
DEEPSPEED_DIR = "deepspeed"  # = engines.deepspeed_engine.CHECKPOINT_SUBDIR
DEEPSPEED_TAG = "model"  # = engines.deepspeed_engine.CHECKPOINT_TAG
DEEPSPEED_CLIENT_KEY = "mixtrain"  # = engines.deepspeed_engine.CLIENT_KEY
MEGATRON_DIR = "megatron"  # = engines.megatron_engine.CHECKPOINT_SUBDIR: one shard file per TP rank


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


def engine_format(engine_cfg) -> dict | None:
    """The ``engine`` entry of meta.json for this engine configuration: None for engine=torch (its
    checkpoints carry none), else what a resume must match."""
    if engine_cfg.name == "megatron":
        return {"name": "megatron", "tensor_parallel": int(engine_cfg.tensor_parallel)}
    if engine_cfg.name != "deepspeed":
        return None
    return {"name": "deepspeed", "zero_stage": int(engine_cfg.zero_stage), "precision": engine_cfg.precision}


def check_engine_format(path: Path, saved: dict | None, current: dict | None) -> None:
    """Refuse a checkpoint written by another engine layout (naming the knobs that differ)."""
    saved = saved or {"name": "torch"}
    now = current or {"name": "torch"}
    if saved == now:
        return
    diffs = [
        f"engine.{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    raise CheckpointMismatch(
        f"checkpoint {path} was written by another engine layout; differing knobs:\n  "
        + "\n  ".join(diffs)
        + "\nresume with the same engine knobs, or use train.resume=replace (moves the old run aside) or another "
        "run.dir to start fresh"
    )


def save(ckpt_root: Path, step: int, state: dict, meta: dict, keep: int, engine_save=None, before_commit=None) -> Path:
    """Collective: every rank calls it. Rank 0 writes the state; each rank writes its RNG. Pruning
    to the newest ``keep`` touches only checkpoints of this run (``meta["run_id"]``).
    ``engine_save(tmp_dir)``, when given, is called on every rank instead of writing ``state.pt``
    (an engine's own collective checkpoint, e.g. DeepSpeed's, which stores ``state`` itself).
    ``before_commit(tmp_dir)`` is called on every rank once its files are written, before the
    rename that completes the checkpoint (fault injection: train.fail_in_checkpoint)."""
    rank = dist.env_world()[0] if dist.active() else 0
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"
    previous = latest(ckpt_root)
    try:
        return _save(ckpt_root, rank, final, tmp, step, state, meta, keep, engine_save, before_commit)
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


def _save(
    ckpt_root: Path, rank: int, final: Path, tmp: Path, step: int, state, meta, keep, engine_save, before_commit
) -> Path:
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an earlier interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if engine_save is not None:
        engine_save(tmp)
    elif rank == 0:
        torch.save(state, tmp / "state.pt")
    if before_commit is not None:
        before_commit(tmp)
    dist.barrier()
    if rank == 0:
        _write_json(tmp / "meta.json", {**meta, "step": step, "time": time.time(), "complete": True})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        _write_json(ckpt_root / "latest.json", {"step": step, "path": final.name})
        for old in complete_checkpoints(ckpt_root, of_run=meta.get("run_id"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


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


def complete_checkpoints(ckpt_root: Path, of_run: str | None = "owner") -> list[Path]:
    """Complete checkpoints of one run, oldest first (``*.tmp`` and directories without meta.json
    are not): by default the run its run directory holds (else the newest checkpoint's run), else
    the run with that id (None: every run's)."""
    if not ckpt_root.is_dir():
        return []
    found = sorted(
        (
            p
            for p in ckpt_root.iterdir()
            if is_step_dir(p)
            and (p / "meta.json").is_file()
            and ((p / "state.pt").is_file() or (p / DEEPSPEED_DIR).is_dir())
        ),
        key=lambda p: p.name,
    )
    if of_run is None or not found:
        return found
    wanted = (owner(ckpt_root) or run_id(found[-1])) if of_run == "owner" else of_run
    return [p for p in found if run_id(p) == wanted]


def latest(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def load_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def is_deepspeed(meta: dict) -> bool:
    return (meta.get("engine") or {}).get("name") == "deepspeed"


def _deepspeed_state(path: Path) -> dict:
    """A DeepSpeed checkpoint read without DeepSpeed's engine (no process group): the loop's state
    from its client_state plus ``engine.model``, the full fp32 weights (ZeRO partitions merged by
    DeepSpeed's zero_to_fp32), so readers of ``state["engine"]["model"]`` work for either engine."""
    ds_dir = path / DEEPSPEED_DIR
    tag_dir = ds_dir / DEEPSPEED_TAG
    # rank 0's model states (the one carrying the loop's state): ZeRO-3 names them per rank
    name = next(
        (
            n
            for n in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
            if (tag_dir / n).is_file()
        ),
        None,
    )
    if name is None:
        raise FileNotFoundError(f"{path} is a DeepSpeed checkpoint without rank 0's model states in {tag_dir}")
    files = safe_load.load(tag_dir / name)
    state = dict(files.get(DEEPSPEED_CLIENT_KEY) or {})
    if not any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO-0: the module holds the weights
        model = {k: v.float() for k, v in files["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        safe_load.vet(ds_dir)  # zero_to_fp32 loads with weights_only=False
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            model = dict(get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG))
    state["engine"] = {"model": model}
    return state


def load(path: Path, rank: int, engine_state: bool = True) -> tuple[dict | None, dict, dict | None]:
    """(state, meta, this rank's RNG state or None if the checkpoint has none for this rank).

    A DeepSpeed checkpoint's state is None with ``engine_state=False`` (the loop loads it through
    the engine: ``DeepSpeedEngine.load_checkpoint``), else its client state with the merged fp32
    model weights under ``engine.model`` (no optimizer state)."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"train.resume={str(path)!r} is not a complete checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if is_deepspeed(meta):
        state = _deepspeed_state(path) if engine_state else None
    elif (meta.get("engine") or {}).get("name") == "megatron":
        if engine_state:  # the model lives in per-TP-rank shards with megatron's parameter names
            raise ValueError(
                f"{path} is an engine=megatron checkpoint (tensor-parallel shards under {MEGATRON_DIR}/): "
                "resume it with engine=megatron and the same engine.tensor_parallel"
            )
        state = None
    else:
        state = safe_load.load(path / "state.pt")
    rng_path = path / f"rng_rank{rank}.pt"
    rng = safe_load.load(rng_path) if rng_path.is_file() else None
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
