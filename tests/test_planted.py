"""The planted shard set (``trainer.commands.planted``), built from a tiny bytes-tokenized shard set."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import make_shardset

from trainer import cli
from trainer.commands import planted
from trainer.config import DataConfig
from trainer.data.domains import load_data
from trainer.data.indexed import IndexedTokens
from trainer.data.shardset import MANIFEST, ShardSet
from trainer.data.tokenizer import EOD_TOKEN, get_tokenizer

VOCAB = 400
NOISE_TOKENS = 100_000
PARAMS = {"vocab_size": VOCAB, "noise_tokens": NOISE_TOKENS, "duplicate": "words", "quiet": True}
ORDER = ["abc", "counting", "noise", "words", "words_dup", "noise_1", "noise_2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source folder, planted folder, its manifest), built once for the module."""
    base = tmp_path_factory.mktemp("planted")
    source = make_shardset(base / "source")
    root = planted.build_planted(source, base / "cache", **PARAMS)
    return source, root, json.loads((root / MANIFEST).read_text())


def _docs(root: Path, rel: str) -> list[np.ndarray]:
    """Documents of ``<domain>/<split>`` or ``targets/<name>/<split>``."""
    ss = ShardSet.load(root)
    *group, name, split = rel.split("/")
    return planted.split_documents((ss.targets if group else ss.domains)[name][split])


def _texts(root: Path, rel: str, tok) -> list[str]:
    return [tok.decode(d.tolist()) for d in _docs(root, rel)]


def test_manifest_domains_and_order(built):
    _, root, meta = built
    assert meta["domain_order"] == ORDER
    assert set(meta["domains"]) == set(ORDER)
    kinds = {name: meta["domains"][name]["kind"] for name in ORDER}
    assert kinds == {
        "abc": "real",
        "counting": "real",
        "noise": "real",
        "words": "real",
        "words_dup": "duplicate",
        "noise_1": "noise",
        "noise_2": "noise",
    }
    for name in ORDER:
        assert ("valid" in meta["domains"][name]["splits"]) == (kinds[name] == "real"), name
    assert meta["domains"]["words_dup"]["duplicate_of"] == "words"
    assert meta["planted"] == {
        "real": ORDER[:4],
        "duplicate": {"domain": "words", "copy": "words_dup"},
        "noise": ["noise_1", "noise_2"],
    }
    assert "words_dup" in meta["description"] and "noise_1" in meta["description"]
    assert set(meta["targets"]["wordy"]["splits"]) == {"train", "valid"}
    assert meta["recipe_hash"][:12] == root.name and root.parent.name == "planted"
    table = planted.format_table(meta)
    assert all(name in table for name in ORDER) and f"bpe-{VOCAB}" in table


def test_duplicate_halves_partition_the_source_domain(built):
    source, root, meta = built
    src_tok, tok = get_tokenizer("bytes"), planted.planted_tokenizer(root)
    original = _texts(source, "words/train", src_tok)
    kept, copy = _texts(root, "words/train", tok), _texts(root, "words_dup/train", tok)
    assert kept and copy
    assert not set(kept) & set(copy)
    assert Counter(kept) + Counter(copy) == Counter(original)
    # Each half keeps the source's order, and the token sequences are the source texts re-encoded.
    assert kept == [t for t in original if t in set(kept)]
    arrays = _docs(root, "words/train") + _docs(root, "words_dup/train")
    assert sorted(a.tolist() for a in arrays) == sorted([*tok.encode(t), tok.eod] for t in original)
    sizes = [meta["domains"][n]["splits"]["train"]["tokens"] for n in ("words", "words_dup")]
    assert abs(sizes[0] - sizes[1]) <= max(a.size for a in arrays)
    # The original keeps its validation split.
    assert _texts(root, "words/valid", tok) == _texts(source, "words/valid", src_tok)


def test_noise_domains_follow_the_corpus_unigram_distribution(built):
    _, root, meta = built
    eod = meta["tokenizer"]["eod"]
    real = [*meta["planted"]["real"], "words_dup"]
    corpus = sum(np.bincount(IndexedTokens(f"{root}/{d}/train").tokens, minlength=VOCAB) for d in real)
    corpus[eod] = 0
    p = corpus / corpus.sum()
    streams = []
    for name in ("noise_1", "noise_2"):
        docs = _docs(root, f"{name}/train")
        assert {d.size for d in docs} == {planted.NOISE_DOC_TOKENS}
        assert all(d[-1] == eod and not np.any(d[:-1] == eod) for d in docs)
        body = np.concatenate([d[:-1] for d in docs])
        assert abs(body.size - NOISE_TOKENS) < planted.NOISE_DOC_TOKENS
        q = np.bincount(body, minlength=VOCAB) / body.size
        assert np.all(q[p == 0] == 0)
        assert 0.5 * np.abs(p - q).sum() < 0.05, name
        streams.append(body)
    assert not np.array_equal(streams[0], streams[1])  # a seed per domain


def test_tokenizer_identity_file_and_round_trip(built):
    source, root, meta = built
    digest = hashlib.sha256((root / planted.TOKENIZER_FILE).read_bytes()).hexdigest()
    assert meta["tokenizer"] == {
        "name": f"bpe-{VOCAB}",
        "vocab_size": VOCAB,
        "eod": VOCAB - 1,
        "files": {"tokenizer.json": digest},
    }
    tok = planted.planted_tokenizer(root)
    assert tok.identity() == meta["tokenizer"]
    for text in ["the cat sat on the mat", "  naïve café — 12 34\n\tend ", f"a{EOD_TOKEN}b", "🤗 \x00"]:
        ids = tok.encode(text)
        assert tok.eod not in ids and max(ids) < VOCAB
        assert tok.decode(ids) == text
    assert tok.encode_batch(["abc", "def"]) == [tok.encode("abc"), tok.encode("def")]
    # Targets are the source's examples under the new tokenizer, split again: 2/3 held out, disjoint.
    src = {t for s in ("train", "valid") for t in _texts(source, f"targets/wordy/{s}", get_tokenizer("bytes"))}
    new = {s: [tok.decode(d.tolist()) for d in _docs(root, f"targets/wordy/{s}")] for s in ("train", "valid")}
    assert set(new["train"]) | set(new["valid"]) == src and not set(new["train"]) & set(new["valid"])
    assert len(new["valid"]) == round(planted.DEFAULT_TARGET_VALID * len(src))


def test_trainer_loaders_open_it(built):
    _, root, _ = built
    ss = ShardSet.load(root)
    assert list(ss.domains) == ORDER and set(ss.targets) == {"wordy"}
    bundle = load_data(DataConfig(source="path", path=str(root), seq_len=4), quiet=True)
    assert bundle.domains == ORDER
    assert set(bundle.valid) == {"abc", "counting", "noise", "words"}
    assert bundle.vocab_size == VOCAB and set(bundle.targets) == {"wordy"}


def test_second_call_is_a_cache_hit(built, monkeypatch, capsys):
    source, root, _ = built
    stamp = (root / MANIFEST).stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached planted set")

    monkeypatch.setattr(planted, "_build_into", no_build)
    assert planted.build_planted(source, root.parent.parent, **PARAMS) == root
    cli.main(
        [
            "data",
            "planted",
            "--source",
            str(source),
            "--cache",
            str(root.parent.parent),
            "--vocab",
            str(VOCAB),
            "--noise-tokens",
            str(NOISE_TOKENS),
            "--duplicate",
            "words",
        ]
    )
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(root) and "words_dup" in out
    assert (root / MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="rebuilt"):  # any parameter is part of the key
        planted.build_planted(source, root.parent.parent, **{**PARAMS, "seed": 1})


def test_two_builds_are_byte_identical(built, tmp_path):
    source, root, _ = built
    other = planted.build_planted(source, tmp_path, **PARAMS)
    assert other.name == root.name

    def files(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    mine, theirs = files(root), files(other)
    assert sorted(mine) == sorted(theirs)
    for rel in mine:
        assert mine[rel] == theirs[rel], rel
    assert not [p for p in tmp_path.joinpath("planted").iterdir() if p.name.startswith(".")]  # no scratch left


def test_cap_keeps_whole_documents_and_bad_names_are_refused(built, tmp_path):
    source, _, _ = built
    root = planted.build_planted(
        source, tmp_path, vocab_size=VOCAB, noise_domains=0, duplicate=None, max_tokens_per_domain=300, quiet=True
    )
    meta = json.loads((root / MANIFEST).read_text())
    assert meta["domain_order"] == ORDER[:4]
    tok, src_tok = planted.planted_tokenizer(root), get_tokenizer("bytes")
    for name in ORDER[:4]:
        docs = _docs(root, f"{name}/train")
        assert sum(d.size for d in docs) <= 300 or len(docs) == 1
        original = _texts(source, f"{name}/train", src_tok)
        assert _texts(root, f"{name}/train", tok) == original[: len(docs)]
    with pytest.raises(ValueError, match="not a domain"):
        planted.build_planted(source, tmp_path, vocab_size=VOCAB, duplicate="nope", quiet=True)
    with pytest.raises(ValueError, match="lower vocab_size"):
        planted.build_planted(source, tmp_path, vocab_size=60_000, duplicate=None, quiet=True)
