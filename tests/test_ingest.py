"""``trainer.commands.ingest``: every input format round-trips, splits are stable, errors name their cause."""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from trainer.commands import ingest as ingest_module  # noqa: E402
from trainer.commands.ingest import IngestError, add_parser, ingest  # noqa: E402
from trainer.data.indexed import IndexedTokens, write_indexed  # noqa: E402
from trainer.data.shardset import ShardSet  # noqa: E402
from trainer.data.tokenizer import get_tokenizer  # noqa: E402
from trainer.data.tokenizer_options import load_tokenizer  # noqa: E402

TOK = get_tokenizer("bytes")
ROWS = [{"text": f"web page {i} ✓ héllo", "domain": "web"} for i in range(12)] + [
    {"text": f"def f{i}():\n\n    return {i}", "domain": "code"} for i in range(7)
]


def run(inputs, out, **kw):
    kw.setdefault("tokenizer", "bytes")
    kw.setdefault("quiet", True)
    return ingest(inputs, out, **kw)


def write_jsonl(path: Path, rows) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_parquet(path: Path, rows, row_group_size=3) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def decode_prefix(prefix) -> list[str]:
    """Documents of a prefix: each must end with EOD, and EOD appears nowhere else."""
    tokens = np.asarray(IndexedTokens(prefix).tokens)
    assert tokens.size and tokens[-1] == TOK.eod
    cuts = np.flatnonzero(tokens == TOK.eod)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [bytes(tokens[s:e].astype(np.uint8)).decode() for s, e in zip(starts, cuts)]


def texts(split_map) -> list[str]:
    return [t for split in split_map.values() for t in decode_prefix(split.prefix)]


def domain_texts(rows, domain) -> Counter:
    return Counter(r["text"] for r in rows if r["domain"] == domain)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_json_lines_round_trip(tmp_path, suffix):
    src = write_jsonl(tmp_path / f"data{suffix}", ROWS)
    shards = ShardSet.load(run([src], tmp_path / "out", valid_fraction=0.3))
    assert set(shards.domains) == {"web", "code"}
    for domain, splits in shards.domains.items():
        assert Counter(texts(splits)) == domain_texts(ROWS, domain)
        assert set(splits) == {"train", "valid"}
        for split in splits.values():
            assert split.documents == len(decode_prefix(split.prefix))
            assert split.tokens == IndexedTokens(split.prefix).num_tokens
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert meta["domains"]["web"]["format_in"] == ["jsonl"]
    assert meta["domains"]["web"]["sources"] == [str(src)]
    assert meta["domains"]["web"]["splits"]["train"]["prefix"] == "web/train"
    assert meta["tokenizer"] == TOK.identity() and not (tmp_path / "out" / "tokenizer.json").exists()
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode  # umask respected, not 0700


def test_parquet_round_trip_over_row_groups(tmp_path):
    rows = [{**r, "extra": 1} for r in ROWS]
    src = write_parquet(tmp_path / "data.parquet", rows)
    shards = ShardSet.load(run([src], tmp_path / "out", valid_fraction=0.3))
    for domain in ("web", "code"):
        assert Counter(texts(shards.domains[domain])) == domain_texts(ROWS, domain)


def test_hf_dataset_dict_round_trip(tmp_path):
    from datasets import Dataset, DatasetDict

    half = len(ROWS) // 2
    DatasetDict({"train": Dataset.from_list(ROWS[:half]), "test": Dataset.from_list(ROWS[half:])}).save_to_disk(
        str(tmp_path / "hf")
    )
    out = run([tmp_path / "hf"], tmp_path / "out", valid_fraction=0.3)
    shards = ShardSet.load(out)
    for domain in ("web", "code"):
        assert Counter(texts(shards.domains[domain])) == domain_texts(ROWS, domain)
    assert json.loads((out / "manifest.json").read_text())["domains"]["web"]["format_in"] == ["hf"]


def test_txt_documents_are_separated_by_two_blank_lines(tmp_path):
    (tmp_path / "book.txt").write_text("\n\nline one\nline two\n\nsame doc\n\n\nsecond\n \n\n\n\nthird\n")
    shards = ShardSet.load(run([f"books={tmp_path / 'book.txt'}"], tmp_path / "out", valid_fraction=0))
    assert set(shards.domains["books"]) == {"train"}
    assert decode_prefix(shards.domains["books"]["train"].prefix) == [
        "line one\nline two\n\nsame doc",
        "second",
        "third",
    ]


def test_named_folder_mixes_formats_without_a_domain_field(tmp_path):
    folder = tmp_path / "code"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    write_parquet(folder / "sub" / "b.parquet", [{"text": "gamma"}])
    (folder / "sub" / "c.txt").write_text("delta\n\n\nepsilon\n")
    (folder / ".hidden.csv").write_text("ignored")
    shards = ShardSet.load(run([f"code={folder}"], tmp_path / "out", valid_fraction=0))
    assert decode_prefix(shards.domains["code"]["train"].prefix) == ["alpha", "beta", "gamma", "delta", "epsilon"]
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert meta["domains"]["code"]["format_in"] == ["jsonl", "parquet", "txt"]
    assert len(meta["domains"]["code"]["sources"]) == 3


def test_per_domain_dirs_and_domain_field_merge(tmp_path):
    root = tmp_path / "corpus"
    for domain in ("news", "wiki"):
        (root / domain).mkdir(parents=True)
        (root / domain / "x.txt").write_text(f"{domain} one\n\n\n{domain} two\n")
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl", [{"text": "more wiki", "domain": "wiki"}, {"text": "blog", "domain": "blog"}]
    )
    shards = ShardSet.load(run([root, mixed], tmp_path / "out", valid_fraction=0, per_domain_dirs=True))
    assert set(shards.domains) == {"news", "wiki", "blog"}
    assert texts(shards.domains["wiki"]) == ["wiki one", "wiki two", "more wiki"]
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert meta["domains"]["wiki"]["sources"] == [str(root / "wiki" / "x.txt"), str(mixed)]


def test_split_is_deterministic_and_keyed_by_id(tmp_path):
    rows = [{"id": f"doc-{i}", "text": f"text number {i}", "domain": "web"} for i in range(60)]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    a = run([src], tmp_path / "a", valid_fraction=0.25)
    b = run([src], tmp_path / "b", valid_fraction=0.25)
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            assert (a / "web" / f"{split}.{ext}").read_bytes() == (b / "web" / f"{split}.{ext}").read_bytes()
    assert ShardSet.load(a).recipe_hash == ShardSet.load(b).recipe_hash
    assert ShardSet.load(run([src], tmp_path / "c", valid_fraction=0.3)).recipe_hash != ShardSet.load(a).recipe_hash

    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    x = ShardSet.load(run([src], tmp_path / "x", valid_fraction=0.25, id_key="id"))
    y = ShardSet.load(run([shuffled], tmp_path / "y", valid_fraction=0.25, id_key="id"))
    valid = set(decode_prefix(x.domains["web"]["valid"].prefix))
    assert valid == set(decode_prefix(y.domains["web"]["valid"].prefix))
    assert 0 < len(valid) < len(rows)


def test_tiny_domain_still_gets_both_splits(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "domain": "d"}, {"text": "two", "domain": "d"}])
    splits = ShardSet.load(run([src], tmp_path / "out", valid_fraction=0.001)).domains["d"]
    assert (splits["train"].documents, splits["valid"].documents) == (1, 1)


def make_prefix(path: Path, docs: list[str]) -> Path:
    write_indexed(path, [np.array(list(d.encode()) + [TOK.eod]) for d in docs], np.uint16)
    return path


def test_megatron_prefix_used_in_place_with_carved_valid(tmp_path):
    docs = [f"megatron doc {i}" for i in range(10)]
    prefix = make_prefix(tmp_path / "old" / "text_document", docs)
    before = (Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes())
    src = write_jsonl(tmp_path / "a.jsonl", ROWS)
    out = run([src], tmp_path / "out", megatron={"old": str(prefix)}, valid_fraction=0.2)
    shards = ShardSet.load(out)
    train, valid = shards.domains["old"]["train"], shards.domains["old"]["valid"]
    assert train.prefix == str(prefix)
    assert Path(valid.prefix) == out / "old" / "valid"
    assert (train.documents, valid.documents) == (8, 2)
    assert decode_prefix(valid.prefix) == docs[8:]
    full = IndexedTokens(prefix)
    assert train.tokens + valid.tokens == full.num_tokens
    assert decode_prefix(prefix)[: train.documents] == docs[:8]
    assert (Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()) == before
    meta = json.loads((out / "manifest.json").read_text())["domains"]["old"]
    assert meta["format_in"] == ["megatron"] and meta["dtype"] == "uint16" and meta["valid_carved"]


def test_megatron_prefix_with_its_own_valid_prefix(tmp_path):
    train = make_prefix(tmp_path / "m" / "train", ["a", "b", "c"])
    valid = make_prefix(tmp_path / "m" / "valid", ["d"])
    shards = ShardSet.load(run([], tmp_path / "out", megatron={"m": f"{train}:{valid}"}))
    assert {k: (s.prefix, s.documents, s.tokens) for k, s in shards.domains["m"].items()} == {
        "train": (str(train), 3, 6),
        "valid": (str(valid), 1, 2),
    }
    assert not (tmp_path / "out" / "m").exists()


def test_megatron_reader_agrees_with_ours(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = run([write_jsonl(tmp_path / "a.jsonl", ROWS)], tmp_path / "out", valid_fraction=0.3)
    for splits in ShardSet.load(out).domains.values():
        for split in splits.values():
            theirs = IndexedDataset(split.prefix)
            ours = IndexedTokens(split.prefix)
            assert len(theirs.document_indices) - 1 == split.documents
            assert np.array_equal(np.concatenate([theirs[i] for i in range(len(theirs))]), np.asarray(ours.tokens))
            assert theirs[len(theirs) - 1][-1] == TOK.eod


def test_targets_are_split_too(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ROWS)
    target = write_jsonl(tmp_path / "eval.jsonl", [{"text": f"question {i}"} for i in range(20)])
    out = run([src], tmp_path / "out", targets={"eval": target}, valid_fraction=0.3)
    shards = ShardSet.load(out)
    assert set(shards.targets["eval"]) == {"train", "valid"}
    assert Path(shards.targets["eval"]["train"].prefix) == out / "targets" / "eval" / "train"
    assert Counter(texts(shards.targets["eval"])) == Counter(f"question {i}" for i in range(20))
    assert "eval" not in shards.domains


def test_summary_table_and_quiet(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", ROWS)
    run([src], tmp_path / "loud", quiet=False)
    out = capsys.readouterr().out
    table = [[cell.strip() for cell in line.split("|")] for line in out.splitlines()]
    assert table[0] == ["domain", "docs", "train tokens", "valid tokens"]
    assert ["web", "12"] in [row[:2] for row in table]
    run([src], tmp_path / "quiet")
    assert capsys.readouterr() == ("", "")


def bad_inputs(tmp_path: Path) -> dict:
    """name -> (inputs, extra kwargs, fragments the error message must contain)."""
    j = lambda name, rows: write_jsonl(tmp_path / name, rows)  # noqa: E731
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    csv = tmp_path / "data.csv"
    csv.write_text("text,domain\n")
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"text": "ok", "domain": "a"}\n{not json\n')
    uint8 = tmp_path / "u8" / "p"
    write_indexed(uint8, [np.array([1, 2, 3])], np.uint8)  # a byte-level corpus without room for EOD 256
    int32 = tmp_path / "i32" / "p"
    write_indexed(int32, [np.array([1, 2, 256])], np.int32)
    wide = tmp_path / "wide" / "p"
    write_indexed(wide, [np.array([300, 256])], np.uint16)  # ids of a larger vocabulary than bytes' 257
    one, two = make_prefix(tmp_path / "pp" / "one", ["x"]), make_prefix(tmp_path / "pp" / "two", ["y"])
    return {
        "missing path": ([tmp_path / "nope.jsonl"], {}, ["does not exist", "nope.jsonl"]),
        "unknown type": ([csv], {}, ["unknown file type", "data.csv"]),
        "missing text": (
            [j("t.jsonl", [{"body": "x", "domain": "a"}])],
            {},
            ["'text'", "t.jsonl", "line 1", "--text-key"],
        ),
        "missing domain": ([j("d.jsonl", [{"text": "x"}])], {}, ["'domain'", "d.jsonl", "--domain-key"]),
        "custom key": ([j("k.jsonl", ROWS)], {"text_key": "content"}, ["'content'", "k.jsonl"]),
        "missing id": ([j("i.jsonl", ROWS)], {"id_key": "uid"}, ["'uid'", "--id-key"]),
        "parquet column": (
            [write_parquet(tmp_path / "p.parquet", [{"body": "x", "domain": "a"}])],
            {},
            ["'text'", "p.parquet", "body"],
        ),
        "non-string text": ([j("n.jsonl", [{"text": 5, "domain": "a"}])], {}, ["'text'", "is int", "n.jsonl"]),
        "null text": ([j("z.jsonl", [{"text": None, "domain": "a"}])], {}, ["'text'", "is null"]),
        "empty file domain": ([f"quiet={empty}"], {}, ["domain 'quiet' is empty"]),
        "empty texts domain": (
            [j("e.jsonl", [{"text": "", "domain": "hollow"}, {"text": "x", "domain": "a"}])],
            {},
            ["domain 'hollow' is empty", "1 empty"],
        ),
        "unsafe domain": (
            [j("u.jsonl", [{"text": "x", "domain": "../up"}])],
            {},
            ["'../up'", "u.jsonl", "safe folder name"],
        ),
        "unsafe name": ([f"a b={empty}"], {}, ["'a b'", "safe folder name"]),
        "txt without name": ([empty], {}, ["NAME=", "empty.txt"]),
        "bad json": ([badjson], {}, ["bad.jsonl line 2", "not valid JSON"]),
        "megatron missing": ([], {"megatron": {"old": str(tmp_path / "gone")}}, ["'old'", "gone"]),
        "megatron dtype": ([], {"megatron": {"small": str(uint8)}}, ["'small'", "uint8", "257"]),
        "megatron dtypes differ": (
            [],
            {"megatron": {"mixed": [str(one), str(int32)]}},
            ["'mixed'", "different dtypes", "uint16", "int32"],
        ),
        "megatron vocabulary": (
            [],
            {"megatron": {"wide": str(wide)}},
            ["'wide'", "token id 300", "257", "--tokenizer"],
        ),
        "megatron valid for some": (
            [],
            {"megatron": {"part": [f"{one}:{two}", str(two)]}},
            ["'part'", "VALID_PREFIX", "every prefix"],
        ),
        "megatron glob": ([], {"megatron": {"g": str(tmp_path / "pp" / "z*")}}, ["'g'", "z*", "matches nothing"]),
        "glob matches nothing": ([f"web={tmp_path}/none-*.jsonl"], {}, ["none-*.jsonl", "matches nothing"]),
        "workers": ([j("w.jsonl", ROWS)], {"workers": 0}, ["workers=0", "--workers"]),
        "megatron clash": (
            [j("c.jsonl", ROWS)],
            {"megatron": {"web": str(make_prefix(tmp_path / "w", ["x"]))}},
            ["domain 'web'", "megatron"],
        ),
        "bad fraction": ([j("f.jsonl", ROWS)], {"valid_fraction": 1.0}, ["valid_fraction"]),
        "nothing": ([], {}, ["nothing to ingest"]),
    }


ERROR_CASES = [
    "missing path",
    "unknown type",
    "missing text",
    "missing domain",
    "custom key",
    "missing id",
    "parquet column",
    "non-string text",
    "null text",
    "empty file domain",
    "empty texts domain",
    "unsafe domain",
    "unsafe name",
    "txt without name",
    "bad json",
    "megatron missing",
    "megatron dtype",
    "megatron dtypes differ",
    "megatron vocabulary",
    "megatron valid for some",
    "megatron glob",
    "glob matches nothing",
    "workers",
    "megatron clash",
    "bad fraction",
    "nothing",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_name_their_cause_and_leave_nothing(tmp_path, case):
    cases = bad_inputs(tmp_path)
    assert sorted(cases) == sorted(ERROR_CASES)
    inputs, kwargs, fragments = cases[case]
    parent = tmp_path / "shards"
    parent.mkdir()
    with pytest.raises(IngestError) as err:
        run(inputs, parent / "out", **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert list(parent.iterdir()) == []


def test_failure_after_good_input_leaves_no_out_dir(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "domain": "a"}, {"text": 3, "domain": "a"}])
    with pytest.raises(IngestError, match="bad.jsonl line 2"):
        run([good, bad], tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_out_dir_needs_overwrite(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", ROWS)
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": "only", "domain": "solo"}])
    out = run([first], tmp_path / "out")
    with pytest.raises(IngestError, match="overwrite"):
        run([second], out)
    assert set(ShardSet.load(out).domains) == {"web", "code"}
    run([second], out, overwrite=True)
    assert set(ShardSet.load(out).domains) == {"solo"}
    assert not (out / "web").exists() and leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    assert ShardSet.load(run([second], tmp_path / "empty")).domains["solo"]


def test_megatron_prefix_inside_out_dir_is_refused_on_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ROWS)
    out = run([src], tmp_path / "out")
    with pytest.raises(IngestError, match="inside out_dir"):
        run([], out, megatron={"web": str(out / "web" / "train")}, overwrite=True)


def cli(argv):
    parser = argparse.ArgumentParser(prog="mixtrain data")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path):
    src = write_jsonl(tmp_path / "code.jsonl", [{"body": f"x = {i}"} for i in range(5)])
    prefix = make_prefix(tmp_path / "m" / "p", ["a", "b", "c"])
    target = write_jsonl(tmp_path / "eval.jsonl", [{"body": "q"}, {"body": "r"}])
    out = cli(
        [
            "ingest",
            f"code={src}",
            "--out",
            str(tmp_path / "out"),
            "--tokenizer",
            "bytes",
            "--text-key",
            "body",
            "--valid-fraction",
            "0.5",
            "--megatron",
            f"old={prefix}",
            "--target",
            f"eval={target}",
            "--quiet",
        ]
    )
    shards = ShardSet.load(out)
    assert set(shards.domains) == {"code", "old"} and set(shards.targets) == {"eval"}
    with pytest.raises(SystemExit, match="does not exist"):
        cli(["ingest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2"), "--quiet"])
    with pytest.raises(SystemExit, match="given twice"):
        cli(["ingest", "--out", str(tmp_path / "o3"), "--megatron", f"a={prefix}", "--megatron", f"a={prefix}"])


# ---------------------------------------------------------------- Hugging Face tokenizers, workers, many inputs


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hf_documents(prefix, tok) -> list[str]:
    tokens = np.asarray(IndexedTokens(prefix).tokens)
    cuts = np.flatnonzero(tokens == tok.eod)
    assert tokens[-1] == tok.eod
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(np.concatenate([[0], cuts[:-1] + 1]), cuts)]


def test_hf_tokenizer_round_trips_and_its_identity_is_recorded(tmp_path):
    path = train_tokenizer(tmp_path / "bpe" / "tokenizer.json")
    tok = load_tokenizer(str(path))
    out = run([write_jsonl(tmp_path / "a.jsonl", ROWS)], tmp_path / "out", tokenizer=str(path), valid_fraction=0.3)
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["tokenizer"] == tok.identity() and meta["tokenizer"]["files"] == {
        "tokenizer.json": tok.files["tokenizer.json"]
    }
    shards = ShardSet.load(out)
    for domain, splits in shards.domains.items():
        assert Counter(t for s in splits.values() for t in hf_documents(s.prefix, tok)) == domain_texts(ROWS, domain)
    # Another EOD choice is another tokenizer: a new recipe, and a set that records the other id.
    other = run([write_jsonl(tmp_path / "a.jsonl", ROWS)], tmp_path / "o", tokenizer=load_tokenizer(str(path), "Ġ"))
    assert ShardSet.load(other).tokenizer["eod"] != tok.eod and ShardSet.load(other).recipe_hash != shards.recipe_hash
    # Each set ships the file it was written with and names its EOD: reloading the set's folder, the
    # planted builder's reader and export-model's search all find that identity.
    from trainer.commands.planted import source_tokenizer
    from trainer.data import tokenizer_export

    for root in (out, other):
        identity = ShardSet.load(root).tokenizer
        assert (root / "tokenizer.json").read_bytes() == path.read_bytes()
        assert load_tokenizer(str(root)).identity() == source_tokenizer(root, identity).identity() == identity
        assert tokenizer_export.build(identity, [root])[1] == ("<|endoftext|>" if root == out else "Ġ")


def test_any_number_of_workers_writes_the_same_bytes(tmp_path, monkeypatch):
    """Batches of 5 documents or 40 characters over several inputs, so 2 and 3 workers finish them out of order."""
    monkeypatch.setattr(ingest_module, "BATCH", 5)
    monkeypatch.setattr(ingest_module, "BATCH_CHARS", 40)
    rows = [{"text": f"page {i} " * (i % 7) + "✓", "domain": ("web", "code", "news")[i % 3]} for i in range(60)]
    rows[9]["text"] = ""  # an empty text, skipped and counted
    write_jsonl(tmp_path / "in" / "a.jsonl", rows[:35])
    write_parquet(tmp_path / "in" / "b.parquet", rows[35:])
    (tmp_path / "book.txt").write_text("\n\n\n".join(f"chapter {i}" for i in range(12)))
    tok = str(train_tokenizer(tmp_path / "bpe" / "tokenizer.json"))
    inputs = [tmp_path / "in", f"books={tmp_path / 'book.txt'}"]
    sets = {n: tree(run(inputs, tmp_path / f"w{n}", tokenizer=tok, workers=n, valid_fraction=0.3)) for n in (1, 2, 3)}
    assert sets[1] == sets[2] == sets[3]
    manifest = json.loads(sets[1]["manifest.json"])
    assert set(manifest["domains"]) == {"web", "code", "news", "books"}
    assert manifest["domains"]["web"]["empty_texts_skipped"] == 1


def test_globs_and_repeated_names_add_inputs_to_one_domain(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / "web" / f"part-{i}.jsonl", [{"text": f"web {i}.{k}"} for k in range(2)])
    write_jsonl(tmp_path / "more.jsonl", [{"text": "web extra"}])
    write_jsonl(tmp_path / "mixed" / "m.jsonl", [{"text": "tagged", "domain": "web"}])
    out = run(
        [f"web={tmp_path}/web/part-*.jsonl", f"web={tmp_path / 'more.jsonl'}", f"{tmp_path}/mixed/**/*.jsonl"],
        tmp_path / "out",
        valid_fraction=0,
    )
    assert decode_prefix(ShardSet.load(out).domains["web"]["train"].prefix) == [
        *(f"web {i}.{k}" for i in range(3) for k in range(2)),
        "web extra",
        "tagged",
    ]
    assert len(json.loads((out / "manifest.json").read_text())["domains"]["web"]["sources"]) == 5


def test_several_megatron_prefixes_make_one_domain(tmp_path):
    parts = [
        make_prefix(tmp_path / "m" / f"part{i}_text_document", [f"doc {i}.{k}" for k in range(5)]) for i in range(3)
    ]
    docs = [f"doc {i}.{k}" for i in range(3) for k in range(5)]
    out = run([], tmp_path / "out", megatron={"old": [str(parts[0]), str(tmp_path / "m" / "part[12]_text_document")]})
    meta = json.loads((out / "manifest.json").read_text())["domains"]["old"]
    assert meta["sources"] == [str(p) for p in parts] and meta["splits"]["train"]["prefix"] == "old/train"
    splits = ShardSet.load(out).domains["old"]
    assert (
        decode_prefix(splits["train"].prefix)[: splits["train"].documents] + decode_prefix(splits["valid"].prefix)
        == docs
    )
    valids = [make_prefix(tmp_path / "v" / f"v{i}", [f"held {i}"]) for i in range(2)]
    out = run([], tmp_path / "out2", megatron={"old": [f"{parts[0]}:{valids[0]}", f"{parts[1]}:{valids[1]}"]})
    splits = ShardSet.load(out).domains["old"]
    assert decode_prefix(splits["train"].prefix) == docs[:10]
    assert decode_prefix(splits["valid"].prefix) == ["held 0", "held 1"]


def test_cli_tokenizer_workers_and_repeated_megatron(tmp_path, capsys):
    src = write_jsonl(tmp_path / "code.jsonl", [{"text": f"x = {i}"} for i in range(5)])
    one, two = make_prefix(tmp_path / "m" / "one", ["a", "b"]), make_prefix(tmp_path / "m" / "two", ["c", "d"])
    tok = train_tokenizer(tmp_path / "bpe" / "tokenizer.json", special=("<|endoftext|>", "<|end|>"))
    out = tmp_path / "out"
    flags = ["--tokenizer", str(tok), "--eod-token", "<|end|>", "--workers", "2", "--quiet", "--out", str(out)]
    cli(["ingest", f"code={src}", "--megatron", f"old={one}", "--megatron", f"old={two}", *flags])
    shards = ShardSet.load(out)
    assert shards.tokenizer == load_tokenizer(str(tok), "<|end|>").identity()
    assert sum(s.documents for s in shards.domains["old"].values()) == 4
    with pytest.raises(SystemExit, match=r"mixtrain data ingest: error: --tokenizer='nope' is neither a named"):
        cli(["ingest", f"code={src}", "--out", str(tmp_path / "o2"), "--tokenizer", "nope"])
    with pytest.raises(SystemExit, match=r"--eod-token='<\|x\|>' is not a token of --tokenizer="):
        cli(["ingest", f"code={src}", "--out", str(tmp_path / "o3"), "--tokenizer", str(tok), "--eod-token", "<|x|>"])
