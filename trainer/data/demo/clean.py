"""Cleaning: raw package contents -> plain-text documents, one function per source.

Every function here is pure (text or bytes in, :class:`Doc` list out) so each recipe of
``shared/reference/data-sources.md`` §3 is unit-tested on a few inline lines, and the builder only
does file I/O around them. Outputs are deterministic: inputs are taken in the order given (the
builder sorts file lists), nothing depends on dict or set iteration order.

Bump :data:`CLEANING_VERSION` whenever any output of this module changes: it is part of the recipe
hash, so a changed cleaner builds a new shard set instead of reusing a stale one.
"""

from __future__ import annotations

import html
import json
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import mwparserfromhell

CLEANING_VERSION = "1"
CHUNK_CHARS = 16_000
DICTD_GROUP_CHARS = 8_000
LEGAL_MIN_CHARS = 400
LEGAL_DEDUPE_CHARS = 2_000


@dataclass(frozen=True)
class Doc:
    """One document; ``source`` names the unit that train/valid splitting hashes (file, work, entry)."""

    source: str
    text: str


def chunk_text(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Split at blank lines into pieces of at most ``max_chars``; an overlong paragraph is cut hard.

    Paragraphs are re-joined with the blank line they were split at, so a text under the limit comes
    back unchanged. Whitespace-only pieces are dropped.
    """
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    chunks: list[str] = []
    current = ""
    for para in text.split("\n\n"):
        if len(para) > max_chars:
            if current:
                chunks.append(current)
                current = ""
            cut = [para[i : i + max_chars] for i in range(0, len(para), max_chars)]
            chunks.extend(cut[:-1])
            para = cut[-1]
        candidate = f"{current}\n\n{para}" if current else para
        if len(candidate) <= max_chars:
            current = candidate
        else:
            chunks.append(current)
            current = para
    if current:
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def _collapse_blank_lines(text: str) -> str:
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text).strip()


# --- code -----------------------------------------------------------------------------------------


def python_sources(files: Iterable[tuple[str, bytes]], max_bytes: int = 400_000) -> list[Doc]:
    """One document per ``.py`` file; generated tables (> ``max_bytes``) and non-UTF-8 files are skipped."""
    docs = []
    for path, data in files:
        if len(data) > max_bytes:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs.append(Doc(path, text))
    return docs


# --- math: metamath -------------------------------------------------------------------------------

_MM_PROOF = re.compile(r"\$=.*?\$\.", re.S)


def strip_metamath_proofs(text: str) -> str:
    """Replace each proof ``$= … $.`` (compressed proofs are base-26 noise) by a placeholder."""
    return _MM_PROOF.sub("$= ... $.", text)


def metamath_docs(name: str, text: str, max_chars: int = CHUNK_CHARS) -> list[Doc]:
    """Proof-stripped database, chunked; each chunk is its own split unit.

    set.mm alone is ~80% of the domain, so hashing whole files would put most of the domain on one
    side of the split; consecutive chunks hold distinct statements, so per-chunk units leak nothing.
    """
    chunks = chunk_text(strip_metamath_proofs(text), max_chars)
    return [Doc(f"{name}#{i:05d}", chunk) for i, chunk in enumerate(chunks)]


# --- encyclopedic: Wikipedia XML ------------------------------------------------------------------

_PAGE = re.compile(r"<page>(.*?)</page>", re.S)
_TITLE = re.compile(r"<title>(.*?)</title>", re.S)
_NS = re.compile(r"<ns>(\d+)</ns>")
_TEXT = re.compile(r"<text[^>]*>(.*?)</text>", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_CATEGORY_LINE = re.compile(r"^\s*Category:.*$", re.M)


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of one article: references and category links dropped, markup stripped."""
    text = mwparserfromhell.parse(_REF.sub("", wikitext)).strip_code()
    return _collapse_blank_lines(_CATEGORY_LINE.sub("", text))


def wiki_articles(xml: str) -> list[Doc]:
    """Articles (namespace 0, not redirects) of a MediaWiki XML dump, title first."""
    docs = []
    for page in _PAGE.findall(xml):
        ns, title, body = _NS.search(page), _TITLE.search(page), _TEXT.search(page)
        if ns is None or ns.group(1) != "0" or title is None or body is None:
            continue
        wikitext = html.unescape(body.group(1))
        if wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = wikitext_to_text(wikitext)
        if text:
            title_text = html.unescape(title.group(1)).strip()
            docs.append(Doc(f"wikipedia/{title_text}", f"{title_text}\n\n{text}"))
    return docs


# --- dictd (GCIDE, FOLDOC) ------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(digits: str) -> int:
    """Decode a dictd index number: base 64, alphabet ``A–Z a–z 0–9 + /``, most significant first."""
    value = 0
    for ch in digits:
        index = _B64.find(ch)
        if index < 0:
            raise ValueError(f"{digits!r} is not a dictd base-64 number")
        value = value * 64 + index
    return value


def dictd_entries(index: str, data: bytes) -> list[str]:
    """Entry texts in file order: each distinct (offset, length) once, the ``00-database*`` headers dropped.

    Many headwords point at the same entry (inflections, alternate spellings); ordering by offset
    also restores the dictionary's own order, which keeps related entries together.
    """
    pairs, skip = set(), set()
    for line in index.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        pair = (dictd_number(fields[1]), dictd_number(fields[2]))
        (skip if fields[0].startswith("00-database") else pairs).add(pair)
    entries = []
    for offset, length in sorted(pairs - skip):
        text = data[offset : offset + length].decode("utf-8", errors="replace").strip()
        if text:
            entries.append(text)
    return entries


def dictd_docs(name: str, entries: list[str], group_chars: int = DICTD_GROUP_CHARS) -> list[Doc]:
    """Consecutive entries grouped into documents of about ``group_chars`` characters."""
    docs, group, size = [], [], 0
    for entry in entries:
        group.append(entry)
        size += len(entry) + 2
        if size >= group_chars:
            docs.append(Doc(f"{name}#{len(docs):05d}", "\n\n".join(group)))
            group, size = [], 0
    if group:
        docs.append(Doc(f"{name}#{len(docs):05d}", "\n\n".join(group)))
    return docs


# --- books: Austen from an R lazy-load database ---------------------------------------------------

_STRSXP = 16
_LATIN1_LEVEL = 1 << 2


class _XdrReader:
    """Big-endian ints and byte strings of R's XDR serialisation."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return value

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError("R serialisation is truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def _r_character_vector(obj: bytes) -> list[str | None] | None:
    """The character vector in one serialised R object, or None if the object is something else."""
    if obj[:2] != b"X\n":
        raise ValueError("not an R XDR serialisation (expected 'X\\n')")
    r = _XdrReader(obj)
    r.pos = 2
    version = r.int()
    r.int(), r.int()  # writer version, minimal reader version
    if version == 3:
        r.bytes(r.int())  # native encoding name
    if r.int() & 0xFF != _STRSXP:
        return None
    n = r.int()
    if n == -1:  # long vector: length in two ints
        n = (r.int() << 32) + r.int()
    out: list[str | None] = []
    for _ in range(n):
        flags, length = r.int(), r.int()
        if length == -1:
            out.append(None)
            continue
        raw = r.bytes(length)
        out.append(raw.decode("latin-1" if (flags >> 12) & _LATIN1_LEVEL else "utf-8"))
    return out


def read_rdb_character_vectors(rdb: bytes) -> list[list[str | None]]:
    """All character vectors of an R lazy-load ``.rdb``, in file order.

    The file is a run of records, each a 4-byte big-endian uncompressed size and a zlib stream;
    the stream's end is found by decompressing it, so the ``.rdx`` index is not needed.
    """
    vectors, pos = [], 0
    while pos < len(rdb):
        if pos + 4 > len(rdb):
            raise ValueError(f"truncated record header at byte {pos}")
        (size,) = struct.unpack_from(">I", rdb, pos)
        inflater = zlib.decompressobj()
        obj = inflater.decompress(rdb[pos + 4 :])
        if not inflater.eof or len(obj) != size:
            raise ValueError(f"record at byte {pos} is corrupt (expected {size} bytes)")
        pos = len(rdb) - len(inflater.unused_data)
        vector = _r_character_vector(obj)
        if vector is not None:
            vectors.append(vector)
    return vectors


_AUSTEN_HEADING = re.compile(r"^(?:VOLUME|CHAPTER|Chapter)\b")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def austen_chapters(lines: list[str | None], min_chars: int = 200) -> list[Doc]:
    """One novel (one line per element) -> one document per chapter.

    Volume and chapter headings start a new piece; pieces that are only a heading or front matter
    (title, "By Jane Austen") fall under ``min_chars`` and are dropped.
    """
    lines = [line or "" for line in lines]
    title = next((line.strip() for line in lines if line.strip()), "untitled")
    pieces: list[list[str]] = [[]]
    for line in lines:
        if _AUSTEN_HEADING.match(line):
            pieces.append([])
        pieces[-1].append(line)
    texts = [_collapse_blank_lines("\n".join(piece)) for piece in pieces]
    texts = [t for t in texts if len(t) >= min_chars]
    return [Doc(f"austen/{_slug(title)}/{i:03d}", t) for i, t in enumerate(texts)]


# --- books: King James Bible ----------------------------------------------------------------------

_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def kjv_books(output: str) -> list[Doc]:
    """``bible -f`` output (``Ge1:1 In the beginning…``) -> one document per book, prefixes stripped."""
    books: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = _VERSE.match(line)
        if match:
            books.setdefault(match.group(1), []).append(match.group(4).strip())
    return [Doc(f"kjv/{book}", "\n".join(verses)) for book, verses in books.items()]


# --- books and drama: Gutenberg texts -------------------------------------------------------------

_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$", re.M | re.I
)


def gutenberg_body(text: str) -> str:
    """The work itself: the Project Gutenberg header and licence footer cut off when present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return _collapse_blank_lines(text.replace("\r\n", "\n"))


# --- techdocs -------------------------------------------------------------------------------------


def rst_docs(files: Iterable[tuple[str, str]]) -> list[Doc]:
    """reST sources, one document per page; ``whatsnew/changelog`` (a bug-number list) is skipped."""
    return [Doc(path, text) for path, text in files if "whatsnew/changelog" not in path and text.strip()]


# --- legal ----------------------------------------------------------------------------------------

_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:])")  # left where a removed group ended a line
_LRE_WILDCARD = re.compile(r"__\d+__")
_LRE_COMMENT = re.compile(r"//\*\*.*?\*\*//", re.S)
_LRE_TOKEN = re.compile(r"(\(\(|\)\)\?\?|\)\)|\|\||__\d+__)")  # captured: split() keeps the markers


def _lre_expand(tokens: list[str], pos: int) -> tuple[list[str], int]:
    """Parse alternatives up to the closing ``))``; returns each alternative's text and the end position."""
    alternatives, current = [], []
    while pos < len(tokens):
        tok = tokens[pos]
        pos += 1
        if tok == "((":
            inner, pos = _lre_expand(tokens, pos)
            current.append(max(inner, key=len))
        elif tok in ("))", "))??"):
            break
        elif tok == "||":
            alternatives.append("".join(current))
            current = []
        elif not _LRE_WILDCARD.fullmatch(tok):
            current.append(tok)
    alternatives.append("".join(current))
    return alternatives, pos


def lre_to_text(lre: str) -> str:
    """A licenseclassifier template as plain licence text.

    Template syntax: ``//** … **//`` comments, ``(( a || b ))`` alternatives, ``((…))??`` optional
    parts, ``__N__`` wildcards. Comments and wildcards are removed, optional parts kept, and of each
    set of alternatives the longest is kept (usually the full wording, e.g. Apache-2.0's whole
    licence rather than its short file notice). Templates put one phrase per line, so each paragraph
    is re-flowed into one line.
    """
    stream = [t for t in _LRE_TOKEN.split(_LRE_COMMENT.sub("", lre)) if t]
    out, pos = [], 0
    while pos < len(stream):  # top level: an unmatched "))" is skipped, not fatal
        alternatives, pos = _lre_expand(stream, pos)
        out.append(max(alternatives, key=len))
    paragraphs = re.split(r"\n\s*\n", "".join(out))
    flowed = (_SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(para.split())) for para in paragraphs)
    return "\n\n".join(p for p in flowed if p)


def licenseclassifier_texts(entries: list[dict], skip_ids: set[str]) -> list[tuple[str, str]]:
    """(source, text) of licenseclassifier templates whose SPDX id is not in ``skip_ids``.

    The builder passes the ids it already has as clean SPDX texts: an expanded template is only an
    approximation of the licence, so it is used only where no exact text exists. Entries with an
    empty template (some ids are listed only by URL) are skipped.
    """
    out = []
    for i, entry in enumerate(entries):
        if entry["id"] in skip_ids or not entry.get("lre", "").strip():
            continue
        text = lre_to_text(entry["lre"])
        if text:
            out.append((f"licenseclassifier/{entry['id']}#{i}", text))
    return out


def _legal_key(text: str) -> str:
    return re.sub(r"\W+", "", text.lower())[:LEGAL_DEDUPE_CHARS]


def legal_docs(texts: Iterable[tuple[str, str]]) -> list[Doc]:
    """Licence and constitutional texts; short ones dropped, near-duplicates (same normalised start) kept once."""
    docs, seen = [], set()
    for source, text in texts:
        text = _collapse_blank_lines(text.replace("\r\n", "\n"))
        key = _legal_key(text)
        if len(text) < LEGAL_MIN_CHARS or key in seen:
            continue
        seen.add(key)
        docs.append(Doc(source, text))
    return docs


# --- target sets ----------------------------------------------------------------------------------


def humaneval_examples(jsonl: str) -> list[Doc]:
    """HumanEval problems as ``prompt + canonical_solution`` (the tests are not training text)."""
    docs = []
    for line in jsonl.splitlines():
        if line.strip():
            row = json.loads(line)
            docs.append(Doc(row["task_id"], row["prompt"] + row["canonical_solution"]))
    return docs


def champ_examples(dataset: dict) -> list[Doc]:
    """CHAMP problems as "Problem: … Solution: … Answer: …".

    Only the problem, its solution steps and the answer are read: the ``conversations`` and
    ``fws_annotations`` fields are LLM answers to the same problems and would leak the target.
    """
    docs = []
    for key in sorted(dataset["problems"]):
        problem = dataset["problems"][key]
        steps = " ".join(step["_text"].strip() for step in problem["solution"]["steps"])
        text = f"Problem: {problem['_text'].strip()}\nSolution: {steps}\nAnswer: {problem['_answer'].strip()}"
        docs.append(Doc(key, text))
    return docs


def lee_articles(text: str) -> list[Doc]:
    """The Lee news corpus: one article per line."""
    lines = [line.strip() for line in text.splitlines()]
    return [Doc(f"lee/{i:03d}", line) for i, line in enumerate(lines) if line]
