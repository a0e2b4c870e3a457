"""Token shards in Megatron's indexed format (``PREFIX.bin`` + ``PREFIX.idx``).

Writing goes through ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` so the files
are Megatron's own. Reading in the training hot path uses a small parser of the ``.idx`` header
plus a numpy memmap of the ``.bin``: the ``.bin`` is every document's tokens back to back, so a
domain is one contiguous token stream and a training sample is a slice of it. Importing megatron
costs ~5 s, which the trainer should not pay on every start; ``tests/test_indexed.py`` proves the
two readers agree.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType enum (indexed_dataset.py): code -> numpy dtype.
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


class ShardFormatError(ValueError):
    """A file pair that is missing or not in Megatron's indexed format."""


def exists(prefix: str | os.PathLike) -> bool:
    prefix = str(prefix)
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


@contextmanager
def _building(prefix: str | os.PathLike, dtype) -> Iterator:
    """Megatron's ``IndexedDatasetBuilder`` writing under a temporary name, renamed to ``prefix`` at
    the end, so an interrupted write never leaves a prefix that looks complete."""
    with warnings.catch_warnings():  # megatron announces missing Transformer Engine/Apex on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    # megatron's DType lookup wants the scalar type, not a dtype instance
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.dtype(dtype).type)
    yield builder
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")


def write_indexed(prefix: str | os.PathLike, documents: Iterable[np.ndarray], dtype=np.uint16) -> dict:
    """Write documents (1-D integer arrays, each already ending with EOD) as one Megatron prefix.

    Returns ``{"documents": n, "tokens": t, "max_token": largest id}`` (-1 if empty), which a
    manifest records so a load checks the ids against the model without a scan.
    """
    dtype = np.dtype(dtype).type
    n_docs = n_tokens = 0
    top = -1
    info = np.iinfo(dtype)
    with _building(prefix, dtype) as builder:
        for doc in documents:
            doc = np.asarray(doc)
            if doc.size == 0:
                continue
            if doc.min() < info.min or doc.max() > info.max:
                raise ValueError(f"token ids outside the range of {np.dtype(dtype).name} while writing {prefix}")
            builder.add_document(doc.astype(dtype, copy=False), [int(doc.size)])
            n_docs += 1
            n_tokens += int(doc.size)
            top = max(top, int(doc.max()))
    return {"documents": n_docs, "tokens": n_tokens, "max_token": top}


def merge_indexed(prefixes: list[str | os.PathLike], out: str | os.PathLike) -> None:
    """Concatenate Megatron prefixes of one dtype, in order, into ``out`` (megatron's ``add_index``:
    the ``.bin`` files are copied whole, the indexes joined)."""
    with _building(out, IndexedTokens(prefixes[0]).dtype) as builder:
        for prefix in prefixes:
            builder.add_index(str(prefix))


@dataclass
class IndexedTokens:
    """Read-only view of one Megatron prefix as a flat token stream."""

    prefix: str
    max_tokens: int | None = None
    """Use only the first max_tokens tokens (a split carved from the front of a larger prefix); more
    than the .bin holds is refused (a truncated file)."""
    recorded_max: int | None = None
    """The largest token id as the manifest recorded it at build time (None: scan for it)."""

    def __post_init__(self):
        self.prefix = str(self.prefix)
        if not exists(self.prefix):
            raise FileNotFoundError(
                f"no Megatron shard at prefix {self.prefix!r} (expected {self.prefix}.bin and .idx)"
            )
        with open(self.prefix + ".idx", "rb") as f:
            header = f.read(len(_HEADER))
            if header != _HEADER:
                raise ShardFormatError(f"{self.prefix}.idx is not a Megatron index (bad magic)")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != 1:
                raise ShardFormatError(f"{self.prefix}.idx has index version {version}, only 1 is supported")
            (code,) = struct.unpack("<B", f.read(1))
            if code not in _DTYPES:
                raise ShardFormatError(f"{self.prefix}.idx has unknown dtype code {code}")
            self.dtype = np.dtype(_DTYPES[code])
            self.sequence_count, self.document_count = struct.unpack("<QQ", f.read(16))
            self._offset = f.tell()
        bin_bytes = os.path.getsize(self.prefix + ".bin")
        if bin_bytes % self.dtype.itemsize:
            raise ShardFormatError(f"{self.prefix}.bin size is not a multiple of {self.dtype.itemsize}")
        self.num_tokens = bin_bytes // self.dtype.itemsize
        described = int(self.sequence_lengths.sum(dtype=np.int64))
        if described != self.num_tokens:
            raise ShardFormatError(
                f"{self.prefix}.bin holds {self.num_tokens:,} tokens but its .idx describes "
                f"{described:,}: the pair is damaged or mismatched (truncated, or one file "
                "replaced); rebuild or re-ingest it"
            )
        if self.max_tokens is not None:
            if int(self.max_tokens) > self.num_tokens:
                raise ShardFormatError(
                    f"{self.prefix}.bin holds {self.num_tokens:,} tokens, fewer than the "
                    f"{int(self.max_tokens):,} its manifest records: truncated; rebuild it"
                )
            self.num_tokens = int(self.max_tokens)

    @cached_property
    def tokens(self) -> np.ndarray:
        if self.num_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.prefix + ".bin", dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    @cached_property
    def sequence_lengths(self) -> np.ndarray:
        return np.fromfile(self.prefix + ".idx", dtype=np.int32, count=self.sequence_count, offset=self._offset)

    def max_token(self) -> int:
        """Largest token id: the manifest's record, else scanned in blocks (once, against the model's
        vocabulary)."""
        if self.recorded_max is not None:
            return int(self.recorded_max)
        best = -1
        for s in range(0, self.num_tokens, 1 << 24):
            best = max(best, int(self.tokens[s : s + (1 << 24)].max()))
        return best
