"""Hugging Face tokenizers from local files, never the hub: a ``tokenizer.json`` file or a tokenizer folder.

- A ``tokenizer.json`` file, or a folder holding one, runs on the ``tokenizers`` library, even where
  ``transformers`` is installed: the ids and the identity then do not depend on which packages a
  machine has.
- A folder without ``tokenizer.json`` (``vocab.json`` + ``merges.txt``, a SentencePiece
  ``tokenizer.model``, ...) needs ``transformers``: ``AutoTokenizer.from_pretrained(folder,
  local_files_only=True)``; a fast tokenizer it builds runs on its ``tokenizers`` backend.

Texts are encoded without the tokenizer's own special tokens (no BOS, no post-processor template),
and a special token spelled out in a text is text, as with tiktoken's ``encode_ordinary``: the
caller appends EOD to each document.

**EOD** is ``eod_token`` when given; else the folder's ``eos_token`` (``tokenizer_config.json``,
then ``special_tokens_map.json``; with ``transformers``, the tokenizer's ``eos_token``); else
``<|endoftext|>``; else ``</s>``. A tokenizer with none of them is refused, naming the option.

**Identity**: name ``<model>-<vocabulary>`` (``bpe-128256``, ``unigram-32000``) unless given; the
vocabulary size is the largest id + 1 (ids with gaps still fit); the EOD id; the sha256 of the files
that decide the ids: ``tokenizer.json`` alone when there is one (the config files only choose EOD,
which the identity holds as an id, so a file and its folder are the same tokenizer), else every
tokenizer file ``transformers`` reads from the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import TOKENIZERS
from .tokenizer import Tokenizer, TokenizerError, file_sha256

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
FALLBACK_EOD = ("<|endoftext|>", "</s>")


class _TokenizersEncoding:
    """The slice of tiktoken's Encoding API that :class:`Tokenizer` calls, on a ``tokenizers.Tokenizer``."""

    def __init__(self, tok):
        # Like tiktoken's encode_ordinary: a literal "<|endoftext|>" in a text is text, never EOD.
        tok.encode_special_tokens = True
        self._tok = tok
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets encode computes: 15-20%
        # less CPU on code. It runs a batch on the library's thread pool (RAYON_NUM_THREADS), one
        # text on one thread.
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def __reduce__(self):
        # A pickled tokenizers.Tokenizer forgets encode_special_tokens: rebuild through __init__.
        return type(self), (self._tok,)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encode([text], add_special_tokens=False)[0].ids

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        # num_threads is tiktoken's knob; the tokenizers library sizes its own pool.
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class _TransformersEncoding:
    """The same slice on a slow (pure Python) ``transformers`` tokenizer."""

    def __init__(self, tok):
        self._tok = tok

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _config_eos(folder: Path) -> str | None:
    """The ``eos_token`` a folder's tokenizer config names (a string or an AddedToken dict), if any."""
    for fname in CONFIG_FILES:
        path = folder / fname
        if path.is_file():
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
    return None


def _pick_eod(vocab: dict, eod_token: str | None, eos: str | None, where: str, eod_knob: str) -> str:
    if eod_token is not None:
        if eod_token not in vocab:
            raise TokenizerError(f"{eod_knob}={eod_token!r} is not a token of {where}")
        return eod_token
    for token in (eos, *FALLBACK_EOD):
        if token is not None and token in vocab:
            return token
    raise TokenizerError(
        f"{where} has no end-of-document token: no eos_token in its {' or '.join(CONFIG_FILES)} and neither "
        f"{' nor '.join(FALLBACK_EOD)} in its vocabulary; name one with {eod_knob}=TOKEN"
    )


def _from_tokenizer_json(path: Path, eos: str | None, eod_token, name, where: str, eod_knob: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for any unreadable file
        raise TokenizerError(f"{where}: {path} is not a readable tokenizers tokenizer.json ({e})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = max(vocab.values()) + 1
    eod = _pick_eod(vocab, eod_token, eos, where, eod_knob)
    return Tokenizer(
        name=name or f"{type(tok.model).__name__.lower()}-{vocab_size}",
        vocab_size=vocab_size,
        eod=vocab[eod],
        files={TOKENIZER_JSON: file_sha256(path)},
        _encoding=_TokenizersEncoding(tok),
        source_file=str(path.resolve()),
        eod_token=eod,
    )


def _from_transformers(folder: Path, eod_token, name, where: str, eod_knob: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(
            f"{where} is a folder without {TOKENIZER_JSON}; other tokenizer formats load through "
            "transformers' AutoTokenizer: pip install transformers (or give a tokenizer.json)"
        ) from None
    try:
        # split_special_tokens: a slow tokenizer, too, reads a special token spelled out in a text as text.
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, split_special_tokens=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{where}: transformers' AutoTokenizer cannot load the folder offline ({e})") from None
    vocab = tok.get_vocab()
    vocab_size = max(vocab.values()) + 1
    read = [*CONFIG_FILES, "added_tokens.json", *type(tok).vocab_files_names.values()]
    if tok.is_fast:
        kind, encoding = type(tok.backend_tokenizer.model).__name__.lower(), _TokenizersEncoding(tok.backend_tokenizer)
    else:
        kind, encoding = type(tok).__name__.lower(), _TransformersEncoding(tok)
    eod = _pick_eod(vocab, eod_token, tok.eos_token, where, eod_knob)
    return Tokenizer(
        name=name or f"{kind}-{vocab_size}",
        vocab_size=vocab_size,
        eod=vocab[eod],
        files={f: file_sha256(folder / f) for f in sorted(set(read)) if (folder / f).is_file()},
        _encoding=encoding,
        eod_token=eod,
    )


def ship(tok: Tokenizer, root: Path) -> None:
    """Copy the ``tokenizer.json`` ``tok`` was read from into a shard set's folder ``root``, with a
    ``tokenizer_config.json`` naming its EOD as ``eos_token``: the set then holds the tokenizer it
    was written with (loading ``root`` gives the same identity; export-model finds the file there by
    its sha256). A tokenizer read from no ``tokenizer.json`` (named, or through transformers) ships
    nothing."""
    if tok.source_file is None:
        return
    shutil.copyfile(tok.source_file, root / TOKENIZER_JSON)
    (root / CONFIG_FILES[0]).write_text(json.dumps({"eos_token": tok.eod_token}, indent=2) + "\n")


def load_hf_tokenizer(
    path,
    eod_token: str | None = None,
    name: str | None = None,
    *,
    knob: str = "tokenizer",
    eod_knob: str = "eod_token",
) -> Tokenizer:
    """A :class:`Tokenizer` from a local ``tokenizer.json`` or tokenizer folder (module docstring).

    ``knob`` and ``eod_knob`` are the options a refusal names; ``name`` replaces the derived name.
    """
    where = f"{knob}={str(path)!r}"
    path = Path(path).expanduser()
    if path.is_file():
        return _from_tokenizer_json(path, None, eod_token, name, where, eod_knob)
    if path.is_dir():
        if (path / TOKENIZER_JSON).is_file():
            return _from_tokenizer_json(path / TOKENIZER_JSON, _config_eos(path), eod_token, name, where, eod_knob)
        return _from_transformers(path, eod_token, name, where, eod_knob)
    raise TokenizerError(
        f"{where} is neither a named tokenizer ({', '.join(TOKENIZERS)}) nor an existing tokenizer.json "
        "file or Hugging Face tokenizer folder"
    )
