"""How a command refuses: the message alone on one line, exit status 2.

Bad input (a knob, a file, a checkpoint that does not fit) is the user's to fix, so a traceback
only hides the line that says what to change; ``HYDRA_FULL_ERROR=1`` brings it back.
"""

from __future__ import annotations

import os
import sys

from .errors import Diverged


def refusals() -> tuple[type[Exception], ...]:
    """The errors that mean bad input or a run that must not continue (printed as one line, exit 2)."""
    from mixtures.base import MixtureConfigError

    from .checkpoint import CheckpointMismatch, CheckpointWriteError
    from .config import ConfigError
    from .data.indexed import ShardFormatError
    from .data.sampler import DataExhausted
    from .safe_load import UnsafeCheckpoint

    return (
        ConfigError,
        MixtureConfigError,
        CheckpointMismatch,
        UnsafeCheckpoint,
        ShardFormatError,
        DataExhausted,
        Diverged,
        CheckpointWriteError,
    )


def refuse(error: Exception, prog: str = "mixtrain") -> None:
    """Exit 2 with the message alone, printed once (by rank 0 of a multi-rank job); HYDRA_FULL_ERROR=1
    shows the traceback instead. A run that failed on its way (diverged, a full disk: not the
    input's fault) exits 1."""
    from .checkpoint import CheckpointWriteError

    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(1 if isinstance(error, (Diverged, CheckpointWriteError)) else 2)
