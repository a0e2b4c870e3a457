"""``mixtrain data ingest``: tokenize user data into a shard set (see ``shardset.py`` for the layout).

Inputs, each a path or ``NAME=PATH``; a path may be a glob (``web=data/web-*.jsonl.gz``, ``**`` recursive),
matched in sorted order, and one domain may be named by several inputs (``code=a.jsonl code=b/``):

- JSON lines (``.jsonl``, ``.json``, optionally ``.gz``) and Parquet files with a text field and a
  domain field (``text_key``, ``domain_key``). Parquet is streamed in record batches.
- A folder saved by Hugging Face ``datasets`` ``save_to_disk`` (it holds ``dataset_info.json``,
  ``state.json`` or ``dataset_dict.json``) with text and domain columns; every split of a
  ``DatasetDict`` is read, then re-split here.
- A plain folder: every supported file under it, sorted, recursive (dot files skipped).
- ``NAME=PATH``: all documents of PATH (file, folder or ``datasets`` folder) belong to domain NAME;
  no domain field is read. With ``per_domain_dirs=True`` a folder's sub-folders are the domains.
- ``.txt`` files (only as ``NAME=PATH``): documents are separated by two or more consecutive blank
  lines, so a single blank line (a paragraph break) stays inside a document; leading and trailing
  newlines of each document are dropped.
- ``megatron={name: "PREFIX[:VALID_PREFIX]"}`` (or a list of them; a prefix may be a glob over
  ``PREFIX.bin``): existing ``.bin/.idx`` prefixes. One prefix is referenced in place by absolute
  path, never copied; several are concatenated, in the order given, into ``<name>/train`` (and
  ``<name>/valid``) here by megatron's own ``IndexedDatasetBuilder.add_index``. Either every
  prefix of a domain has a valid prefix or none has; without one, the last ``valid_fraction`` of
  the documents is copied into ``<name>/valid`` and the train split keeps the prefix but records
  only the documents before them: **a split always means the first ``tokens`` tokens of its
  prefix**, which is the whole ``.bin`` for every split this module writes itself.

Tokenizer: ``gpt2``, ``bytes`` or a local Hugging Face ``tokenizer.json`` / tokenizer folder
(``trainer.data.hf_tokenizer``; ``--eod-token`` picks its EOD). ``workers`` processes tokenize
(``trainer.data.encode_pool``); the output is byte-identical for any number of them.

Train/valid: a document is valid when a 64-bit blake2b hash of its id, read as a fraction of
2**64, is below ``valid_fraction``. The id is the ``id_key`` field if given, else the file's path
relative to the input's parent plus its line/row number, so moving the data does not change the
split. With ``valid_fraction > 0`` and at least two documents both splits are non-empty (the
nearest document is moved across); a split with no documents is left out of the manifest.

Every document is stored with EOD appended; empty texts are skipped. A domain with no document
left is an error. The set is built in a temporary sibling folder and renamed into place at the
end, so a failed ingest leaves nothing behind.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainer.data.encode_pool import EncodePool
from trainer.data.hf_tokenizer import ship
from trainer.data.indexed import IndexedTokens, ShardFormatError, exists, merge_indexed, write_indexed
from trainer.data.shardset import MANIFEST, write_manifest
from trainer.data.tokenizer import Tokenizer, TokenizerError
from trainer.data.tokenizer_options import add_tokenizer_options, load_tokenizer, tokenizer_from_options

SUFFIXES = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "jsonl",
    ".json.gz": "jsonl",
    ".parquet": "parquet",
    ".txt": "txt",
    ".txt.gz": "txt",
}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
BATCH = 1024  # texts per tokenizer call and rows per Parquet/datasets batch
BATCH_CHARS = 1 << 20
"""A tokenizer batch also ends at this many characters: with large documents, 1024 of them would be
a few batches for the whole input, too few to share among workers."""
KNOBS = {"text": "text_key / --text-key", "domain": "domain_key / --domain-key", "id": "id_key / --id-key"}


class IngestError(ValueError):
    """A problem with the inputs or options; the message names the path, field, domain or knob."""


@dataclass(frozen=True)
class Keys:
    text: str
    domain: str
    id: str | None


@dataclass(frozen=True)
class Source:
    """One readable input (a file or a ``datasets`` folder) and where its documents go."""

    path: Path  # absolute
    fmt: str  # jsonl | parquet | txt | hf
    group: str  # "domains" or "targets"
    name: str | None  # fixed domain/target; None: read from the domain field
    label: str  # path relative to the input's parent: stable prefix of default document ids


# ---------------------------------------------------------------- inputs -> sources


def _check_name(name: str, what: str, origin: str = "") -> str:
    """Names become folder names in the shard set, so only a safe character set is accepted."""
    if not SAFE_NAME.fullmatch(name):
        raise IngestError(
            f"{what} {name!r}{origin} is not a safe folder name: use letters, digits, '_', '.', '-' "
            "and start with a letter, digit or '_'"
        )
    return name


def _matches(pattern: str | os.PathLike, suffix: str = "", what: str = "input path") -> list[Path]:
    """The path, or the sorted paths a glob matches (each with ``suffix``, which is then cut off:
    Megatron prefixes are matched by their ``.bin``); an existing path is never read as a glob."""
    p = Path(pattern).expanduser()
    if Path(f"{p}{suffix}").exists():
        return [p.resolve()]
    if glob.has_magic(str(p)):
        found = sorted(glob.glob(f"{p}{suffix}", recursive=True))
        if not found:
            raise IngestError(f"{what} pattern {str(p)!r} matches nothing")
        return [Path(f[: len(f) - len(suffix)]).resolve() for f in found]
    raise IngestError(f"{what} {str(p)!r} does not exist")


def _is_hf(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in HF_MARKERS)


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise IngestError(
        f"unknown file type for {path}: supported are {', '.join(SUFFIXES)} files and "
        "folders saved by datasets' save_to_disk"
    )


def _files(folder: Path) -> list[Path]:
    """Every non-hidden file under folder, sorted, so the document order (and the .bin) is reproducible."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise IngestError(f"folder {folder} holds no input files")
    return files


def _file_source(path: Path, group: str, name: str | None, base: Path) -> Source:
    fmt = _format_of(path)
    if fmt == "txt" and name is None:
        raise IngestError(f"{path} is a .txt file, which has no domain field: pass it as NAME={path}")
    return Source(path, fmt, group, name, path.relative_to(base).as_posix())


def _sources(path: Path, group: str, name: str | None) -> list[Source]:
    """A file, a ``datasets`` folder or a folder of files, all of domain ``name`` (None: from the field)."""
    if _is_hf(path):
        return [Source(path, "hf", group, name, path.name)]
    if path.is_dir():
        return [_file_source(f, group, name, path.parent) for f in _files(path)]
    return [_file_source(path, group, name, path.parent)]


def _split_named(spec: str | os.PathLike) -> tuple[str | None, str | os.PathLike]:
    """``NAME=PATH`` names a domain; an existing path is always a path, so file names may contain '='."""
    if isinstance(spec, os.PathLike) or "=" not in spec or Path(spec).exists():
        return None, spec
    name, _, path = spec.partition("=")
    return name, path


def _domain_dirs(folder: Path) -> list[Source]:
    """``per_domain_dirs``: each sub-folder is one domain; a loose file would have no domain, so it is refused."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    loose = [p.name for p in entries if not p.is_dir()]
    if loose:
        raise IngestError(f"per-domain folder {folder} holds files outside domain sub-folders: {', '.join(loose)}")
    if not entries:
        raise IngestError(f"per-domain folder {folder} has no sub-folders")
    return [s for sub in entries for s in _sources(sub, "domains", _check_name(sub.name, "domain"))]


def _expand_input(spec, per_domain_dirs: bool) -> list[Source]:
    name, pattern = _split_named(spec)
    if name is not None:
        name = _check_name(name, "domain")
        return [s for path in _matches(pattern) for s in _sources(path, "domains", name)]
    out = []
    for path in _matches(pattern):
        if per_domain_dirs and path.is_dir() and not _is_hf(path):
            out += _domain_dirs(path)
        else:
            out += _sources(path, "domains", None)
    return out


# ---------------------------------------------------------------- sources -> rows


def _open_text(path: Path):
    """UTF-8, gzip when the name says so; universal newlines make CRLF files split like LF ones."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_documents(lines: Iterable[str]) -> Iterator[str]:
    """Documents separated by runs of 2+ blank lines; single blank lines stay inside a document."""
    doc: list[str] = []
    blanks: list[str] = []
    for line in lines:
        if not line.strip():
            blanks.append(line)
            continue
        if doc and len(blanks) >= 2:
            yield "".join(doc).strip("\n")
            doc = []
        elif doc:
            doc.extend(blanks)
        blanks = []
        doc.append(line)
    if doc:
        yield "".join(doc).strip("\n")


def _jsonl_rows(source: Source, keys: Keys) -> Iterator[tuple[str, dict]]:
    with _open_text(source.path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise IngestError(
                    f"{source.path} line {n} is not valid JSON ({e.msg}); .json/.jsonl inputs "
                    "are read as JSON lines, one object per line"
                ) from None
            if not isinstance(row, dict):
                raise IngestError(
                    f"{source.path} line {n} is a JSON {type(row).__name__}, expected an object "
                    f"with a {keys.text!r} field"
                )
            yield f"line {n}", row


def _require_columns(source: Source, present: list[str], wanted: list[str]) -> None:
    for kind, key in zip(("text", "domain", "id"), wanted):
        if key is not None and key not in present:
            raise IngestError(
                f"{source.path} has no {kind} field {key!r} (set by {KNOBS[kind]}); its columns: {', '.join(present)}"
            )


def _columns(source: Source, keys: Keys) -> list[str | None]:
    """Columns to read, in (text, domain, id) order; None where that field is not read."""
    return [keys.text, keys.domain if source.name is None else None, keys.id]


def _batch_rows(batch: dict, where: str, start: int) -> Iterator[tuple[str, dict]]:
    names = list(batch)
    for i, values in enumerate(zip(*batch.values())):
        yield f"{where}row {start + i}", dict(zip(names, values))


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(f"{path} is not a readable Parquet file: {e}") from None


def _parquet_rows(source: Source, keys: Keys) -> Iterator[tuple[str, dict]]:
    """Batch by batch (row groups are read one at a time), so a large file never sits in memory."""
    pf = _parquet_file(source.path)
    wanted = _columns(source, keys)
    _require_columns(source, pf.schema_arrow.names, wanted)
    start = 0
    for batch in pf.iter_batches(batch_size=BATCH, columns=[c for c in wanted if c is not None]):
        yield from _batch_rows(batch.to_pydict(), "", start)
        start += batch.num_rows


def _hf_splits(path: Path) -> list[tuple[str, object]]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    return sorted(data.items()) if isinstance(data, DatasetDict) else [("", data)]


def _hf_rows(source: Source, keys: Keys) -> Iterator[tuple[str, dict]]:
    wanted = _columns(source, keys)
    for split, ds in _hf_splits(source.path):
        _require_columns(source, ds.column_names, wanted)
        part = ds.select_columns([c for c in wanted if c is not None])
        for start in range(0, len(part), BATCH):
            yield from _batch_rows(part[start : start + BATCH], f"{split} " if split else "", start)


def _txt_rows(source: Source, keys: Keys) -> Iterator[tuple[str, dict]]:
    with _open_text(source.path) as f:
        for n, text in enumerate(_txt_documents(f)):
            yield f"document {n}", {keys.text: text}


READERS = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "hf": _hf_rows, "txt": _txt_rows}


def _row_count(source: Source) -> int | None:
    """Rows ahead, for the progress bar; only the columnar formats know it without a pass."""
    if source.fmt == "parquet":
        return _parquet_file(source.path).metadata.num_rows
    if source.fmt == "hf":
        return sum(len(ds) for _, ds in _hf_splits(source.path))
    return None


def _field(row: dict, key: str, kind: str, source: Source, where: str, types=(str,)):
    if key not in row:
        raise IngestError(
            f"{source.path} {where} has no {kind} field {key!r} (set by {KNOBS[kind]}); "
            f"its fields: {', '.join(map(str, row))}"
        )
    value = row[key]
    if not isinstance(value, types):
        got = "null" if value is None else type(value).__name__
        expected = " or ".join(t.__name__ for t in types)
        raise IngestError(f"{source.path} {where}: {kind} field {key!r} is {got}, expected {expected}")
    return value


def _documents(rows: Iterable[tuple[str, dict]], source: Source, keys: Keys) -> Iterator[tuple[str, str, str]]:
    """(domain, document id, text) per row, with every field checked."""
    for where, row in rows:
        text = _field(row, keys.text, "text", source, where)
        name = source.name
        if name is None:
            name = _check_name(
                _field(row, keys.domain, "domain", source, where), "domain", f" (in {source.path} {where})"
            )
        doc_id = (
            f"{source.label}:{where}" if keys.id is None else str(_field(row, keys.id, "id", source, where, (str, int)))
        )
        yield name, doc_id, text


# ---------------------------------------------------------------- documents -> prefixes


def _split_score(doc_id: str) -> float:
    """A document's place in [0, 1): a fixed hash, unlike ``hash()``, is the same in every process and run."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _valid_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Hash split, then make both splits non-empty when the data allows, by moving the nearest document."""
    valid = scores < fraction
    if fraction > 0 and len(scores) >= 2:
        if not valid.any():
            valid[np.argmin(scores)] = True
        elif valid.all():
            valid[np.argmax(scores)] = False
    return valid


@dataclass
class Spill:
    """Tokenized documents of one domain or target, appended to a scratch file until all inputs are read.

    A JSON lines file may interleave every domain while ``write_indexed`` writes one prefix from one
    stream; tokens therefore wait in a flat file, and only lengths and split scores stay in memory.
    """

    path: Path
    dtype: np.dtype
    lengths: array = field(default_factory=lambda: array("q"))
    scores: array = field(default_factory=lambda: array("d"))
    sources: dict = field(default_factory=dict)  # path -> None: ordered set
    formats: set = field(default_factory=set)
    empty: int = 0  # empty texts skipped

    def __post_init__(self):
        self._file = open(self.path, "wb")

    def add(self, docs: list[np.ndarray], doc_ids: list[str]) -> None:
        """Documents (EOD included; an empty array is an empty text, counted and skipped)."""
        kept = [(doc, doc_id) for doc, doc_id in zip(docs, doc_ids) if doc.size]
        self.empty += len(docs) - len(kept)
        if kept:
            np.concatenate([doc for doc, _ in kept]).tofile(self._file)
            self.lengths.extend(doc.size for doc, _ in kept)
            self.scores.extend(_split_score(doc_id) for _, doc_id in kept)

    def write(self, root: Path, rel: str, valid_fraction: float) -> dict:
        """Write ``rel/train`` and ``rel/valid`` under root; returns their manifest entries."""
        self._file.close()
        lengths = np.frombuffer(self.lengths, dtype=np.int64)
        valid = _valid_mask(np.frombuffer(self.scores, dtype=np.float64), valid_fraction)
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        ends = np.cumsum(lengths)
        starts = ends - lengths
        splits = {}
        for split, mask in (("train", ~valid), ("valid", valid)):
            if mask.any():
                docs = (tokens[s:e] for s, e in zip(starts[mask], ends[mask]))
                splits[split] = {
                    "prefix": f"{rel}/{split}",
                    **write_indexed(root / rel / split, docs, self.dtype),
                }
        del tokens
        self.path.unlink()
        return splits

    def close(self) -> None:
        self._file.close()


def _batches(sources: list[Source], keys: Keys) -> Iterator[tuple[tuple, list[str]]]:
    """((source, domain per document, document ids), texts): up to BATCH documents or BATCH_CHARS
    characters of one source at a time."""
    for source in sources:
        batch: list[tuple[str, str, str]] = []
        chars = 0
        try:
            for doc in _documents(READERS[source.fmt](source, keys), source, keys):
                batch.append(doc)
                chars += len(doc[2])
                if len(batch) == BATCH or chars >= BATCH_CHARS:
                    yield _batch(source, batch)
                    batch, chars = [], 0
        except UnicodeDecodeError as e:
            raise IngestError(f"{source.path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if batch:
            yield _batch(source, batch)


def _batch(source: Source, docs: list[tuple[str, str, str]]) -> tuple[tuple, list[str]]:
    names, doc_ids, texts = zip(*docs)
    return (source, names, doc_ids), list(texts)


def _tokenize(
    sources: list[Source], keys: Keys, tokenizer: Tokenizer, workers: int, spill_dir: Path, spills: dict, quiet: bool
) -> None:
    """Read every input, tokenize its batches in ``workers`` processes and append each document, in
    input order, to its domain's spill."""

    def spill(source: Source, name: str) -> Spill:
        key = (source.group, name)
        if key not in spills:
            spills[key] = Spill(spill_dir / f"{len(spills)}.tokens", tokenizer.dtype)
        spills[key].sources[str(source.path)] = None
        spills[key].formats.add(source.fmt)
        return spills[key]

    for source in sources:
        if source.name is not None:
            spill(source, source.name)  # registered even if the file turns out empty, so the error can name it
    counts = [_row_count(s) for s in sources]
    total = None if None in counts else sum(counts)
    with (
        EncodePool(tokenizer, workers) as pool,
        tqdm(total=total, desc="[tokenize]", unit="doc", disable=quiet, leave=False) as bar,
    ):
        for (source, names, doc_ids), flat, lengths in pool.map(_batches(sources, keys)):
            docs = np.split(flat, np.cumsum(lengths)[:-1])
            for name in dict.fromkeys(names):
                rows = [i for i, n in enumerate(names) if n == name]
                spill(source, name).add([docs[i] for i in rows], [doc_ids[i] for i in rows])
            bar.update(len(names))


# ---------------------------------------------------------------- existing Megatron prefixes


@dataclass
class MegatronDomain:
    """Existing prefixes of one domain, checked before any tokenizing so a bad one fails fast."""

    name: str
    train: list[Path]
    valid: list[Path]  # empty: carve the valid split off the train documents
    tokenizer: Tokenizer

    @classmethod
    def open(cls, name: str, specs: list[str | os.PathLike], tokenizer: Tokenizer) -> MegatronDomain:
        _check_name(name, "megatron domain")
        parts = [str(spec).partition(":")[::2] for spec in specs]
        if len({bool(valid) for _, valid in parts}) > 1:
            raise IngestError(
                f"megatron domain {name!r}: give a VALID_PREFIX (NAME=PREFIX:VALID_PREFIX) with every prefix "
                "of the domain or with none (then its valid split is carved off the end)"
            )
        what = f"megatron domain {name!r}: prefix"
        train = [_check_prefix(name, p, tokenizer) for t, _ in parts for p in _matches(t, ".bin", what)]
        valid = [_check_prefix(name, p, tokenizer) for _, v in parts if v for p in _matches(v, ".bin", what)]
        dtypes = {IndexedTokens(p).dtype.name: p for p in train + valid}
        if len(dtypes) > 1:
            raise IngestError(
                f"megatron domain {name!r}: its prefixes store different dtypes ("
                + ", ".join(f"{p} {d}" for d, p in dtypes.items())
                + "); one tokenizer's prefixes share one"
            )
        return cls(name, train, valid, tokenizer)

    @property
    def dtype(self) -> np.dtype:
        return IndexedTokens(self.train[0]).dtype

    def entry(self, root: Path, valid_fraction: float) -> dict:
        entry = {
            "format_in": ["megatron"],
            "dtype": self.dtype.name,
            "sources": [str(p) for p in self.train + self.valid],
        }
        train, train_at = _joined(self.train, root, f"{self.name}/train")
        if self.valid:
            valid, valid_at = _joined(self.valid, root, f"{self.name}/valid")
            splits = {"train": _whole_split(train), "valid": {**_whole_split(valid), "prefix": valid_at}}
        else:
            splits = _carve_valid(self.name, train, root, valid_fraction)
            entry["valid_carved"] = "valid" in splits
        splits["train"]["prefix"] = train_at
        for split, info in splits.items():
            if info["max_token"] >= self.tokenizer.vocab_size:
                raise IngestError(
                    f"megatron domain {self.name!r}: its {split} split holds token id {info['max_token']}, beyond "
                    f"the {self.tokenizer.vocab_size} ids of tokenizer {self.tokenizer.name!r}: it was tokenized "
                    "with another vocabulary; pass that tokenizer (--tokenizer)"
                )
        return {**entry, "splits": splits}


def _joined(prefixes: list[Path], root: Path, rel: str) -> tuple[Path, str]:
    """One prefix for a split and how the manifest names it: a single prefix in place (absolute),
    several concatenated into ``root/rel`` (relative, as the set is renamed into place)."""
    if len(prefixes) == 1:
        return prefixes[0], str(prefixes[0])
    merge_indexed(prefixes, root / rel)
    return root / rel, rel


def _check_prefix(name: str, prefix: str, tokenizer: Tokenizer) -> Path:
    """Exists, parses, .bin matches .idx, is not empty, and its dtype can hold every token id of the tokenizer."""
    path = Path(prefix).expanduser().resolve()
    if not exists(path):
        raise IngestError(f"megatron domain {name!r}: no Megatron prefix {path} (expected {path}.bin and {path}.idx)")
    try:
        reader = IndexedTokens(path)
    except (ShardFormatError, OSError) as e:
        raise IngestError(f"megatron domain {name!r}: {e}") from None
    if reader.dtype.kind not in "iu" or np.iinfo(reader.dtype).max < tokenizer.vocab_size - 1:
        raise IngestError(
            f"megatron domain {name!r}: {path} stores {reader.dtype.name}, which cannot hold token ids "
            f"of tokenizer {tokenizer.name!r} (vocabulary {tokenizer.vocab_size})"
        )
    if reader.num_tokens == 0:
        raise IngestError(f"domain {name!r} is empty: megatron prefix {path} holds 0 tokens")
    return path


def _document_starts(prefix: Path) -> np.ndarray:
    """Token offset of each document's start plus the end, from Megatron's own reader of the .idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    seq_starts = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])
    return seq_starts[ds.document_indices]


def _in_place(prefix: Path, documents: int, tokens: int | None = None) -> dict:
    """A split that uses (the front of) a prefix in place; its largest id is scanned once, here, and
    recorded so that every run checks it against the model without reading the tokens."""
    reader = IndexedTokens(prefix, max_tokens=tokens)
    return {"prefix": str(prefix), "documents": documents, "tokens": reader.num_tokens, "max_token": reader.max_token()}


def _whole_split(prefix: Path) -> dict:
    return _in_place(prefix, len(_document_starts(prefix)) - 1)


def _carve_valid(name: str, prefix: Path, root: Path, valid_fraction: float) -> dict:
    """Copy the last ``valid_fraction`` of the documents to ``name/valid``; train keeps the rest in place."""
    starts = _document_starts(prefix)
    n_docs = len(starts) - 1
    n_valid = 0
    if valid_fraction > 0 and n_docs >= 2:
        n_valid = min(max(round(n_docs * valid_fraction), 1), n_docs - 1)
    n_train = n_docs - n_valid
    splits = {"train": _in_place(prefix, n_train, int(starts[n_train]))}
    if n_valid:
        tokens = IndexedTokens(prefix).tokens
        docs = (tokens[starts[k] : starts[k + 1]] for k in range(n_train, n_docs))
        splits["valid"] = {"prefix": f"{name}/valid", **write_indexed(root / name / "valid", docs, tokens.dtype)}
    return splits


# ---------------------------------------------------------------- the shard set


def _fingerprint(path: Path) -> list:
    """(path, size, mtime) of every file: what the recipe hash depends on besides the options."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _recipe_hash(
    sources: list[Source], megatron: list[MegatronDomain], keys: Keys, valid_fraction: float, tokenizer: Tokenizer
) -> str:
    recipe = {
        "inputs": [{"group": s.group, "name": s.name, "files": _fingerprint(s.path)} for s in sources],
        "megatron": {
            m.name: [_fingerprint(Path(f"{p}.{ext}")) for p in m.train + m.valid for ext in ("bin", "idx")]
            for m in megatron
        },
        "keys": {"text": keys.text, "domain": keys.domain, "id": keys.id},
        "valid_fraction": valid_fraction,
        "tokenizer": tokenizer.identity(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_out_dir(out_dir: Path, overwrite: bool, megatron: list[MegatronDomain]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise IngestError(f"out_dir {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise IngestError(f"out_dir {out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    for m in megatron:
        for p in m.train + m.valid:
            if out_dir in p.parents:
                raise IngestError(
                    f"megatron domain {m.name!r}: prefix {p} lies inside out_dir {out_dir}, "
                    "which the new set replaces; write the new set elsewhere"
                )


def _write_spills(spills: dict, root: Path, valid_fraction: float) -> dict:
    """Turn every spill into its train/valid prefixes; empty domains are errors, not silent gaps."""
    out = {"domains": {}, "targets": {}}
    for (group, name), spill in sorted(spills.items()):
        what = "domain" if group == "domains" else "target"
        if not spill.lengths:
            raise IngestError(
                f"{what} {name!r} is empty: 0 documents with text ({spill.empty} empty texts) "
                f"in {', '.join(spill.sources)}"
            )
        rel = name if group == "domains" else f"targets/{name}"
        out[group][name] = {
            "splits": spill.write(root, rel, valid_fraction),
            "sources": list(spill.sources),
            "format_in": sorted(spill.formats),
            "dtype": spill.dtype.name,
            "empty_texts_skipped": spill.empty,
        }
    return out


def _build(
    root: Path,
    sources: list[Source],
    megatron: list[MegatronDomain],
    keys: Keys,
    valid_fraction: float,
    tokenizer: Tokenizer,
    workers: int,
    quiet: bool,
) -> dict:
    spill_dir = root / ".spill"
    spill_dir.mkdir()
    spills: dict[tuple[str, str], Spill] = {}
    try:
        _tokenize(sources, keys, tokenizer, workers, spill_dir, spills, quiet)
    finally:
        for spill in spills.values():
            spill.close()
    clash = sorted({m.name for m in megatron} & {name for group, name in spills if group == "domains"})
    if clash:
        raise IngestError(f"domain {clash[0]!r} is given both as a megatron prefix and by input files")
    meta = _write_spills(spills, root, valid_fraction)
    shutil.rmtree(spill_dir)
    for m in megatron:
        meta["domains"][m.name] = m.entry(root, valid_fraction)
    return meta


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished set into place; an old set (overwrite) is moved aside first, then deleted."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def _table(meta: dict) -> str:
    rows = [("domain", "docs", "train tokens", "valid tokens")]
    for group, prefix in (("domains", ""), ("targets", "targets/")):
        for name, entry in sorted(meta[group].items()):
            splits = entry["splits"]
            counts = (
                sum(s["documents"] for s in splits.values()),
                splits.get("train", {}).get("tokens", 0),
                splits.get("valid", {}).get("tokens", 0),
            )
            rows.append((prefix + name, *(f"{n:,}" for n in counts)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [" | ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows]
    return "\n".join(lines)


def ingest(
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | Tokenizer = "gpt2",
    workers: int = 1,
    text_key: str = "text",
    domain_key: str = "domain",
    valid_fraction: float = 0.02,
    id_key: str | None = None,
    megatron: dict | None = None,
    targets: dict | None = None,
    per_domain_dirs: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Build a shard set in ``out_dir`` from ``inputs`` (paths, globs or ``NAME=PATH``), ``megatron``
    ({name: "PREFIX[:VALID_PREFIX]" or a list of them}) and ``targets`` ({name: path or a list of
    paths}); returns ``out_dir``. ``tokenizer`` is a name, the path of a Hugging Face tokenizer, or a
    :class:`Tokenizer` (``load_tokenizer``, to choose its EOD); ``workers`` processes tokenize.

    Raises ``IngestError`` naming the path, field, domain or option at fault; on any failure
    nothing is left at ``out_dir`` (an existing set is only replaced once the new one is complete).
    """
    if not 0 <= valid_fraction < 1:
        raise IngestError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    if workers < 1:
        raise IngestError(f"workers={workers} (--workers) must be at least 1")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer, knob="--tokenizer")
    keys = Keys(text_key, domain_key, id_key)
    sources = [s for spec in inputs for s in _expand_input(spec, per_domain_dirs)]
    sources += [
        s
        for name, paths in (targets or {}).items()
        for pattern in _listed(paths)
        for path in _matches(pattern)
        for s in _sources(path, "targets", _check_name(name, "target"))
    ]
    domains = [MegatronDomain.open(name, _listed(specs), tok) for name, specs in (megatron or {}).items()]
    if not any(s.group == "domains" for s in sources) and not domains:
        raise IngestError("nothing to ingest: give input paths, NAME=PATH inputs or megatron prefixes")
    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir, overwrite, domains)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.ingest-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stick to the published set
    try:
        meta = _build(tmp, sources, domains, keys, valid_fraction, tok, workers, quiet)
        ship(tok, tmp)
        write_manifest(
            tmp,
            {
                **meta,
                "tokenizer": tok.identity(),
                "missing": {},
                "recipe_hash": _recipe_hash(sources, domains, keys, valid_fraction, tok),
                "ingest": {
                    "text_key": text_key,
                    "domain_key": domain_key,
                    "id_key": id_key,
                    "valid_fraction": valid_fraction,
                },
            },
        )
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(_table(meta))
    return out_dir


# ---------------------------------------------------------------- command line


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _listed(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _grouped(pairs: list[tuple[str, str]] | None, flag: str) -> dict[str, list[str]]:
    """Repeated ``NAME=VALUE`` flags, the values of each name in order; one value twice is refused."""
    out: dict[str, list[str]] = {}
    for name, value in pairs or []:
        if value in out.get(name, []):
            raise IngestError(f"{flag} {name}={value} is given twice")
        out.setdefault(name, []).append(value)
    return out


def _run(args: argparse.Namespace) -> Path:
    """CLI entry: user errors end the command with their message instead of a traceback."""
    try:
        tok = tokenizer_from_options(args)
        return ingest(
            args.inputs,
            args.out,
            tokenizer=tok,
            workers=args.workers,
            text_key=args.text_key,
            domain_key=args.domain_key,
            valid_fraction=args.valid_fraction,
            id_key=args.id_key,
            megatron=_grouped(args.megatron, "--megatron"),
            targets=_grouped(args.target, "--target"),
            per_domain_dirs=args.per_domain_dirs,
            overwrite=args.overwrite,
            quiet=args.quiet,
        )
    except (IngestError, TokenizerError) as e:
        raise SystemExit(f"mixtrain data ingest: error: {e}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``ingest`` on an argparse subparsers object (wired as ``mixtrain data ingest``)."""
    p = subparsers.add_parser(
        "ingest",
        help="tokenize JSONL/Parquet/text/datasets/Megatron data into a shard set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="file, folder or glob with a domain field, or NAME=PATH for files/folders/globs of one domain "
        "(a domain may be named several times)",
    )
    p.add_argument("--out", required=True, help="shard-set folder to create")
    add_tokenizer_options(p)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizing processes; the output is the same for any number (default: 1)",
    )
    p.add_argument("--text-key", default="text", help="field holding the document text (default: text)")
    p.add_argument("--domain-key", default="domain", help="field holding the domain name (default: domain)")
    p.add_argument(
        "--id-key",
        default=None,
        help="field with a stable document id for the train/valid split (default: file path + line/row number)",
    )
    p.add_argument("--valid-fraction", type=float, default=0.02, help="share of each domain's documents held out")
    p.add_argument(
        "--megatron",
        action="append",
        type=_name_value,
        metavar="NAME=PREFIX[:VALID_PREFIX]",
        help="existing .bin/.idx prefix (or glob) used in place as domain NAME; repeated for one NAME, the prefixes "
        "are concatenated into the set",
    )
    p.add_argument(
        "--target",
        action="append",
        type=_name_value,
        metavar="NAME=PATH",
        help="target data (few-shot pool / held-out eval) written to targets/NAME (repeatable, also for one NAME)",
    )
    p.add_argument("--per-domain-dirs", action="store_true", help="folder inputs: each sub-folder is one domain")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing non-empty --out (and its {MANIFEST})")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary table")
    p.set_defaults(func=_run)
    return p
