"""Tokenize batches of documents in worker processes (``mixtrain data ingest --workers N``).

Results come back in the order the batches went in, whatever finishes first, so what is written
from them is byte-identical for any N. Every worker encodes one text at a time on one thread:
``--workers`` is then the number of cores tokenizing (tiktoken's and the ``tokenizers`` library's
batch calls would start threads of their own on top). With one worker the batches are encoded in
the calling process. Workers are spawned, not forked: a fork would copy the thread pools the
parent's libraries (tokenizers, tqdm) may already run, which the ``tokenizers`` library answers
by disabling its parallelism with a warning.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import numpy as np

from .tokenizer import Tokenizer

T = TypeVar("T")
IN_FLIGHT_PER_WORKER = 2
"""Batches queued per worker: enough that none waits for the reader, few enough that memory stays
bounded (a plain ``Executor.map`` would read the whole input ahead)."""

_worker_tokenizer: Tokenizer | None = None


def encode_documents(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each text's ids with EOD appended, back to back in ``tok.dtype``, and each one's length; a
    text without ids (empty) has length 0 and contributes nothing."""
    encoded = [tok.encode(t) for t in texts]
    lengths = np.array([len(ids) + 1 if ids else 0 for ids in encoded], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=tok.dtype)
    end = 0
    for ids, n in zip(encoded, lengths):
        if n:
            flat[end : end + n - 1] = ids
            flat[end + n - 1] = tok.eod
            end += n
    return flat, lengths


def _init_worker(tok: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tok


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_worker_tokenizer, texts)


class EncodePool:
    """``map`` over (key, texts) batches -> (key, flat ids, lengths), in input order; a context manager."""

    def __init__(self, tok: Tokenizer, workers: int):
        if workers < 1:
            raise ValueError(f"workers={workers} must be at least 1")
        self.tok, self.workers = tok, workers
        self._pool = None

    def __enter__(self) -> EncodePool:
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.tok,),
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, batches: Iterable[tuple[T, list[str]]]) -> Iterator[tuple[T, np.ndarray, np.ndarray]]:
        if self._pool is None:
            for key, texts in batches:
                yield key, *encode_documents(self.tok, texts)
            return
        pending: deque = deque()
        for key, texts in batches:
            pending.append((key, self._pool.submit(_encode_in_worker, texts)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * self.workers:
                key0, future = pending.popleft()
                yield key0, *future.result()
        while pending:
            key0, future = pending.popleft()
            yield key0, *future.result()
