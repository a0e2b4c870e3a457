"""What a run prints: one ``[mixtrain]`` line from rank 0."""

from __future__ import annotations


def say(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[mixtrain] {msg}", flush=True)
