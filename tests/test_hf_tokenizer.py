"""Hugging Face tokenizers from local files (``trainer.data.hf_tokenizer``): identity, EOD choice,
refusals naming the option, and the one comparison of identities. The tokenizers are trained here."""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys

import numpy as np
import pytest
from helpers import synthetic_text, tiny_config, train_tokenizer

from trainer.checkpoint import CheckpointMismatch
from trainer.config import ConfigError, DataConfig
from trainer.data.domains import check_vocab, load_data
from trainer.data.indexed import write_indexed
from trainer.data.tokenizer import TokenizerError, identity_difference
from trainer.data.tokenizer_options import load_tokenizer

TEXT = "the cat sat on 12 34 mats\n\tand ran far"


@pytest.fixture
def tok_json(tmp_path):
    return train_tokenizer(tmp_path / "bpe" / "tokenizer.json")


def test_file_and_its_folder_are_one_tokenizer(tok_json):
    tok = load_tokenizer(str(tok_json))
    assert tok.identity() == load_tokenizer(str(tok_json.parent)).identity()
    assert tok.identity()["name"] == "bpe-320" and tok.vocab_size == 320 and tok.eod == 319
    assert set(tok.identity()["files"]) == {"tokenizer.json"}
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and max(ids) < tok.eod
    # A special token spelled out in a text is text (tiktoken's encode_ordinary), also after pickling
    # (how ingest hands the tokenizer to its workers).
    for t in (tok, pickle.loads(pickle.dumps(tok))):
        assert tok.eod not in t.encode("a<|endoftext|>b") and t.decode(t.encode("a<|endoftext|>b")) == "a<|endoftext|>b"


def test_eod_is_the_option_else_eos_else_endoftext_else_eos_s(tmp_path):
    folder = train_tokenizer(tmp_path / "t" / "tokenizer.json", special=("<|endoftext|>", "</s>", "<|end|>")).parent
    vocab = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert load_tokenizer(str(folder)).eod == ids["<|endoftext|>"]
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|end|>"}}))
    assert load_tokenizer(str(folder)).eod == ids["<|end|>"]  # the config's eos, an AddedToken dict
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_tokenizer(str(folder)).eod == ids["</s>"]  # tokenizer_config.json first
    assert load_tokenizer(str(folder), "<|end|>").eod == ids["<|end|>"]  # the option wins
    only_s = train_tokenizer(tmp_path / "s" / "tokenizer.json", special=("</s>",))
    assert load_tokenizer(str(only_s)).eod == 319
    # The identity holds the EOD id: one file read with two EODs is two tokenizers.
    assert identity_difference(
        load_tokenizer(str(folder)).identity(), load_tokenizer(str(folder), "<|end|>").identity()
    )


def test_refusals_name_the_option(tmp_path, tok_json):
    none = train_tokenizer(tmp_path / "n" / "tokenizer.json", special=("<pad>",))
    with pytest.raises(TokenizerError, match=r"--tokenizer=.*has no end-of-document token.*--eod-token=TOKEN"):
        load_tokenizer(str(none), knob="--tokenizer", eod_knob="--eod-token")
    with pytest.raises(TokenizerError, match=r"data\.eod_token='<eos>' is not a token of data\.tokenizer="):
        load_tokenizer(str(tok_json), "<eos>", knob="data.tokenizer", eod_knob="data.eod_token")
    with pytest.raises(TokenizerError, match=r"--tokenizer='gtp2' is neither a named tokenizer \(gpt2, bytes\)"):
        load_tokenizer("gtp2", knob="--tokenizer")
    with pytest.raises(TokenizerError, match=r"--eod-token='x' applies to a Hugging Face tokenizer; --tokenizer=gpt2"):
        load_tokenizer("gpt2", "x", knob="--tokenizer", eod_knob="--eod-token")
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    with pytest.raises(TokenizerError, match="not a readable tokenizers tokenizer.json"):
        load_tokenizer(str(broken))
    with pytest.raises(ConfigError, match=r"data\.eod_token='x' applies to a Hugging Face data\.tokenizer"):
        DataConfig(eod_token="x").validate()


def _slow_folder(tmp_path, tok_json):
    """The trained BPE as a folder without tokenizer.json: vocab.json + merges.txt, GPT-2 style."""
    from tokenizers import Tokenizer

    folder = tmp_path / "slow"
    folder.mkdir()
    Tokenizer.from_file(str(tok_json)).model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
    )
    return folder


def test_folder_without_tokenizer_json_needs_transformers(tmp_path, tok_json, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a machine without it
    with pytest.raises(TokenizerError, match=r"folder without tokenizer\.json.*pip install transformers"):
        load_tokenizer(str(_slow_folder(tmp_path, tok_json)))


@pytest.mark.slow  # importing transformers alone takes 10-20 s on two busy cores
def test_folder_without_tokenizer_json_loads_through_transformers(tmp_path, tok_json):
    pytest.importorskip("transformers")
    tok = load_tokenizer(str(_slow_folder(tmp_path, tok_json)))
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(tok.identity()["files"])
    assert tok.encode(TEXT) == load_tokenizer(str(tok_json)).encode(TEXT)
    assert tok.eod == tok.vocab_size - 1


def test_identity_difference_names_what_differs(tmp_path, tok_json):
    a = load_tokenizer(str(tok_json)).identity()
    other = load_tokenizer(str(train_tokenizer(tmp_path / "o" / "tokenizer.json", seed=1))).identity()
    assert identity_difference(a, dict(a)) is None
    text = identity_difference(a, other)
    assert text.startswith("bpe-320 (vocabulary 320, EOD 319, tokenizer.json ") and " vs bpe-320 " in text
    assert a["files"]["tokenizer.json"][:12] in text and other["files"]["tokenizer.json"][:12] in text
    assert identity_difference(a, load_tokenizer("bytes").identity()).endswith("vs bytes (vocabulary 257, EOD 256)")


def _prefix(path, tok, n_docs=30):
    """A bare Megatron prefix of synthetic text tokenized with ``tok`` (as another pipeline would write it)."""
    texts = synthetic_text("words", n_docs, np.random.default_rng(0)) + synthetic_text(
        "counting", n_docs, np.random.default_rng(1)
    )
    write_indexed(path, [np.array([*tok.encode(t), tok.eod]) for t in texts], tok.dtype)
    return path


def test_bare_prefixes_declare_a_hugging_face_tokenizer(tmp_path, tok_json):
    tok = load_tokenizer(str(tok_json))
    prefix = _prefix(tmp_path / "web_text_document", tok)
    cfg = DataConfig(source="prefixes", prefixes={"web": str(prefix)}, tokenizer=str(tok_json), seq_len=16)
    bundle = load_data(cfg)
    assert bundle.tokenizer == tok.identity() and bundle.vocab_size == 320
    check_vocab(bundle, 320)
    assert bundle.train[0].stream.max_token() > 256  # so claiming the bytes tokenizer (257 ids) must fail
    as_bytes = load_data(dataclasses.replace(cfg, tokenizer="bytes"))
    with pytest.raises(ConfigError, match=r"holds token id \d+, beyond the 257 ids of its tokenizer bytes"):
        check_vocab(as_bytes, 320)
    with pytest.raises(ConfigError, match=r"data\.tokenizer='missing/tokenizer\.json' is neither a named tokenizer"):
        load_data(dataclasses.replace(cfg, tokenizer="missing/tokenizer.json"))
    with pytest.raises(ConfigError, match=r"data\.eod_token='<x>' is not a token of data\.tokenizer="):
        load_data(dataclasses.replace(cfg, eod_token="<x>"))


def test_resume_and_reference_models_check_a_hugging_face_identity(tmp_path, tok_json):
    """The file a run was trained with is replaced (same path, other merges): its resume and its use
    as a reference model are refused, naming the tokenizer."""
    import torch

    from trainer.loop import run
    from trainer.signals import load_reference_model

    tok = load_tokenizer(str(tok_json))
    overrides = {
        "data.source": "prefixes",
        "data.path": None,
        "data.prefixes": {"web": str(_prefix(tmp_path / "web", tok))},
        "data.tokenizer": str(tok_json),
        "train.steps": 2,
    }
    run(tiny_config(tmp_path, tmp_path / "run", **overrides))
    bundle = load_data(tiny_config(tmp_path, tmp_path / "run", **overrides).data)
    assert load_reference_model(str(tmp_path / "run"), bundle, torch.device("cpu")) is not None

    train_tokenizer(tok_json, seed=1)  # another tokenizer.json at the same path
    with pytest.raises(CheckpointMismatch, match=r"tokenizer\.files\.tokenizer\.json: checkpoint '[0-9a-f]{64}'"):
        run(tiny_config(tmp_path, tmp_path / "run", **overrides))
    other = dataclasses.replace(bundle, tokenizer=load_tokenizer(str(tok_json)).identity())
    with pytest.raises(
        ConfigError, match=r"was trained with another tokenizer than this run's data: bpe-320 .* vs bpe-320"
    ):
        load_reference_model(str(tmp_path / "run"), other, torch.device("cpu"))
