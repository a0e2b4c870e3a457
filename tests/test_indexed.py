"""Shards are Megatron's own format: megatron.core.datasets reads what we write, and our
lightweight reader agrees with it token for token."""

import warnings

import numpy as np
import pytest

from trainer.data.indexed import IndexedTokens, ShardFormatError, write_indexed

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset


def test_megatron_reads_what_we_write(tmp_path):
    rng = np.random.default_rng(0)
    docs = [
        np.append(rng.integers(0, 50256, size=int(n)), 50256).astype(np.uint16) for n in rng.integers(1, 300, size=25)
    ]
    info = write_indexed(tmp_path / "code" / "train", docs, dtype=np.uint16)
    assert info == {"documents": 25, "tokens": sum(d.size for d in docs), "max_token": max(int(d.max()) for d in docs)}
    ds = IndexedDataset(str(tmp_path / "code" / "train"))
    assert len(ds) == 25
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    ours = IndexedTokens(tmp_path / "code" / "train")
    assert ours.dtype == np.uint16 and ours.document_count == 26 and ours.sequence_count == 25
    assert np.array_equal(ours.tokens, np.concatenate(docs))
    assert np.array_equal(ours.sequence_lengths, ds.sequence_lengths)


def test_megatron_gpt_dataset_builds_on_our_shards(tmp_path):
    """The full Megatron path (GPTDataset via BlendedMegatronDatasetBuilder) accepts the files."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from trainer.data.tokenizer import get_tokenizer

    tok = get_tokenizer("bytes")
    for name in ("a", "b"):
        docs = [np.array(list(f"{name} document {i} ".encode()) * 5 + [tok.eod], dtype=np.uint16) for i in range(40)]
        write_indexed(tmp_path / name, docs, dtype=np.uint16)
    cfg = GPTDatasetConfig(
        random_seed=1,
        sequence_length=16,
        blend=([str(tmp_path / "a"), str(tmp_path / "b")], [0.7, 0.3]),
        split="100,0,0",
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=None,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [100, 0, 0], lambda: True, cfg).build()
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert len(train) == 100 and abs((ids == 0).mean() - 0.7) < 0.02


def test_reader_rejects_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0" * 8)
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + b"\0" * 30)
    with pytest.raises(ShardFormatError, match="bad magic"):
        IndexedTokens(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no Megatron shard"):
        IndexedTokens(tmp_path / "missing")


def test_interrupted_write_leaves_no_prefix(tmp_path):
    def docs():
        yield np.array([1, 2, 3], dtype=np.uint16)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_indexed(tmp_path / "d", docs(), dtype=np.uint16)
    assert not (tmp_path / "d.bin").exists() and not (tmp_path / "d.idx").exists()
