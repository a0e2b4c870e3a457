"""Loading checkpoint files without running code from them.

A ``.pt`` file is a pickle: loaded with ``weights_only=False`` it may call any importable function
(``os.system`` through ``__reduce__``), so a crafted ``state.pt`` handed to ``train.resume``,
``mixture.reference`` or ``mixtrain score`` would run a shell command. Every load here goes through
torch's restricted unpickler (``weights_only=True``), which rebuilds tensors, containers and plain
values only, plus exactly the numpy globals that rebuild an array or scalar of a numeric dtype
(controllers and samplers keep numpy state). A numpy array of dtype ``object`` is refused: its
elements could be anything.

DeepSpeed loads its own files with ``weights_only=False`` and no way to change it, so
:func:`vet` reads the list of globals a file names (``get_unsafe_globals_in_checkpoint``: the
pickle's opcodes are read, nothing is executed) and refuses any outside :data:`ALLOWED` before
DeepSpeed opens it. A file that names no other global can only rebuild allowed objects, so the
unrestricted load that follows runs nothing.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that names a global the restricted loader will not call."""


def _numpy_globals() -> list:
    dtype_classes = [type(np.dtype(code)) for code in np.typecodes["All"] if code not in "OVSUaMm"]
    return [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype, *dtype_classes]


NUMPY_GLOBALS = _numpy_globals()

ALLOWED = {f"{g.__module__}.{g.__qualname__}" for g in NUMPY_GLOBALS} | {
    # What DeepSpeed's ZeRO optimizer-state files name besides what torch allows by default: an
    # enum, a dataclass of two ints and the loss scaler, rebuilt by setting attributes (none of them
    # defines __setstate__ or __reduce__ that could act).
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}
"""Globals :func:`vet` lets a file name beyond torch's own weights-only allowlist (``module.qualname``)."""


def _refusal(path: Path, detail: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"refused to load {path}: {detail}; mixtrain loads checkpoints only with torch's "
        "weights_only=True unpickler, which cannot run code, so a file it refuses is not "
        "one mixtrain wrote (or it was altered)"
    )


def load(path: Path | str, map_location="cpu", mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with numeric numpy arrays and scalars allowed.
    ``mmap``: tensors stay mapped, not read (checks the file's structure and pickle cheaply)."""
    path = Path(path)
    with torch.serialization.safe_globals(NUMPY_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise _refusal(path, _why(path, e)) from None


def _why(path: Path, error: Exception) -> str:
    """The globals the file names that the loader refused, else the reason in torch's message."""
    try:
        bad = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - ALLOWED)
    except Exception:
        bad = []
    if bad:
        return "it names " + ", ".join(bad)
    told = [p.strip() for p in str(error).split("\n\n") if p.strip()]
    return next(
        (p for p in told if not p.startswith(("Weights only load failed", "Check the documentation"))),
        told[-1] if told else type(error).__name__,
    ).replace("\n", " ")


def vet(path: Path | str) -> None:
    """Refuse ``path`` (a file, or every ``*.pt`` below a folder) if it names a global outside
    :data:`ALLOWED`; nothing in it is executed."""
    path = Path(path)
    for file in sorted(path.rglob("*.pt")) if path.is_dir() else [path]:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception as e:  # not a zip checkpoint, truncated, …: torch's own loader would fail too
            raise _refusal(file, f"it is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
        bad = sorted(set(names) - ALLOWED)
        if bad:
            raise _refusal(file, "it names " + ", ".join(bad))
