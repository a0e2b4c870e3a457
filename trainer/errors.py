"""Errors a run ends with that are not bad input (a leaf module: anything may import it)."""


class Diverged(RuntimeError):
    """A non-finite step the run may not skip (train.on_nonfinite)."""
