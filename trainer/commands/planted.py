"""``mixtrain data planted``: the quality study's shard set, with planted structure whose right answer is known.

Built from an existing shard set (by default the demo corpus, :func:`trainer.data.demo.build_demo`):

- **A small BPE.** The source's documents are decoded to text with the source's tokenizer and
  re-tokenized with a byte-level BPE of ``vocab_size`` ids (one of them EOD, the last id, as in
  GPT-2), trained with the ``tokenizers`` library on the real domains' *training* text only. A small
  vocabulary puts most of a study model's parameters in the transformer (12·L·d²) rather than the
  embedding table (V·d). The trained ``tokenizer.json`` is stored in the set and recorded in the
  manifest's tokenizer identity; :func:`planted_tokenizer` opens it.
- **Real domains**, in the source's order: training split capped at ``max_tokens_per_domain`` new
  tokens (whole documents, in source order: the demo already wrote them in hash order), validation
  split re-tokenized whole.
- **A duplicate domain** ``<duplicate>_dup``: the capped training documents of domain ``duplicate``
  are cut in two disjoint halves by a hash of their text; the original keeps one half (and its
  validation split), the copy gets the other and no validation split. The two are one distribution
  under two names, so a controller should treat them as one domain.
- **Noise domains** ``noise_1 … noise_K``: tokens drawn i.i.d. from the unigram distribution of the
  new tokenizer's ids over the real domains' capped training splits (EOD excluded), packed into
  documents of ``noise_doc_tokens`` tokens (EOD last), one seed per domain, no validation split.
  Nothing in them beyond unigram frequencies is learnable, so they deserve little weight.
- **Target sets**, both splits, re-tokenized whole.

The set lives in ``<cache>/planted/<recipe-hash[:12]>/``; the recipe holds the source manifest's
sha256 and recipe hash, its shard sizes, every parameter, the ``tokenizers`` version and
:data:`VERSION`, so a call whose recipe is already built does no work. It is built in a scratch
folder beside its final name (manifest last) and renamed into place. Documents are processed in a
fixed order, the BPE trainer has no randomness and the noise generators are seeded, so two builds of
one recipe are byte-identical.

The manifest is written with sorted keys; its ``domain_order`` (real domains, then the duplicate,
then the noise) is the order ``ShardSet.load`` and the trainer list the domains in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from trainer.data import indexed, shardset
from trainer.data.hf_tokenizer import load_hf_tokenizer
from trainer.data.tokenizer import EOD_TOKEN, Tokenizer, get_tokenizer, identity_difference

VERSION = 2
"""Bump when the construction changes: it is part of the recipe hash, so old sets are not reused."""
DEFAULT_VOCAB = 2048
DEFAULT_MAX_TOKENS = 1_500_000
"""Per real domain: ~12M training tokens over the demo's 8 domains; the whole build takes 1.5-2 min on 2 cores."""
NOISE_DOC_TOKENS = 1024
DEFAULT_TARGET_VALID = 2 / 3
"""Share of each target set's examples held out for evaluation (the rest is the few-shot pool)."""
BPE_MIN_FREQUENCY = 2
TOKENIZER_FILE = "tokenizer.json"
_ENCODE_BATCH = 64
_DESCRIPTION = (
    "Planted structure for the quality study: the source's real domains re-tokenized with a small byte-level BPE; "
    "'{dup}' is a disjoint half of '{orig}' (same distribution, two names; no valid split); {noise} hold i.i.d. "
    "draws from the corpus unigram distribution packed in {doc}-token documents (nothing to learn beyond "
    "unigram frequencies; no valid split)."
)


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _digest(*parts: object) -> bytes:
    """A stable hash (Python's hash() is salted per process)."""
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()


# --- reading the source --------------------------------------------------------------------------


def source_order(meta: dict) -> list[str]:
    """The source's domains in its intended order: its ``domain_order`` or recipe's ``domains`` first."""
    wanted = meta.get("domain_order") or meta.get("recipe", {}).get("domains") or []
    names = list(meta["domains"])
    return [d for d in wanted if d in names] + [d for d in names if d not in wanted]


def source_tokenizer(root: Path, identity: dict) -> Tokenizer:
    """The tokenizer a shard set was written with: its own ``tokenizer.json`` if it ships one (this
    command's sets, and those ingest and the demo write with a Hugging Face tokenizer: EOD from their
    ``tokenizer_config.json``, else ``<|endoftext|>``), else a named one; refused unless it is the
    manifest's identity."""
    if TOKENIZER_FILE not in identity.get("files", {}):
        return get_tokenizer(identity["name"])
    tok = load_hf_tokenizer(root, name=identity["name"])
    differs = identity_difference(tok.identity(), identity)
    if differs:
        raise ValueError(f"{root / TOKENIZER_FILE} is not the tokenizer its manifest records: {differs}")
    return tok


def split_documents(split: shardset.Split) -> list[np.ndarray]:
    """A split's documents as token arrays (EOD included), limited to the manifest's token count."""
    stream = indexed.IndexedTokens(split.prefix, max_tokens=split.tokens or None)
    ends = np.cumsum(stream.sequence_lengths, dtype=np.int64)
    ends = ends[ends <= stream.num_tokens]
    tokens = np.asarray(stream.tokens)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return [tokens[a:b] for a, b in zip(starts, ends)]


def decode_split(split: shardset.Split, tok: Tokenizer) -> tuple[list[str], int]:
    """A split's documents decoded to text (EOD dropped), and how many source tokens they held without EOD."""
    docs = split_documents(split)
    texts = [tok.decode(d.tolist()) for d in docs]
    return texts, sum(int(np.count_nonzero(d != tok.eod)) for d in docs)


def _shard_sizes(ss: shardset.ShardSet) -> dict:
    """File sizes of every split the source lists: cheap evidence that its shards are the ones its manifest
    describes."""
    out = {}
    for group, entries in (("domains", ss.domains), ("targets", ss.targets)):
        for name, splits in entries.items():
            for s, sp in splits.items():
                out[f"{group}/{name}/{s}"] = [os.path.getsize(sp.prefix + ext) for ext in (".bin", ".idx")]
    return out


# --- the tokenizer ---------------------------------------------------------------------------------


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's pre-tokenizer, all 256 bytes in its alphabet) with ``vocab_size`` ids, EOD last.

    Returns a ``tokenizers.Tokenizer``. The trainer draws no random numbers and breaks ties between
    equally frequent pairs by their ids, so the same texts in the same order give the same merges.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} must exceed the 256 byte tokens plus EOD")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # EOD is added after training so that it takes the last id, as in GPT-2.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=BPE_MIN_FREQUENCY,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    tok.add_special_tokens([EOD_TOKEN])
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(
            f"the training text yields only {got} BPE tokens (merges seen at least {BPE_MIN_FREQUENCY} "
            f"times), fewer than vocab_size={vocab_size}: lower vocab_size"
        )
    return tok


def encode_capped(texts: list[str], tok: Tokenizer, cap: int | None) -> list[np.ndarray]:
    """Encode documents in order, EOD appended, until the next one would pass ``cap`` tokens (the first is always
    kept)."""
    out: list[np.ndarray] = []
    total = 0
    for start in range(0, len(texts), _ENCODE_BATCH):
        for ids in tok.encode_batch(texts[start : start + _ENCODE_BATCH]):
            n = len(ids) + 1
            if cap is not None and out and total + n > cap:
                return out
            out.append(np.asarray([*ids, tok.eod], dtype=tok.dtype))
            total += n
    return out


# --- planted structure -----------------------------------------------------------------------------


def duplicate_mask(texts: list[str], lengths: list[int], salt: str) -> np.ndarray:
    """Which documents go to the copy: texts in hash order, each to the half holding fewer tokens so far.

    Identical texts move together, so the halves share no document text; the greedy fill keeps
    their token counts within one document of each other. True = the copy's half.
    """
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(text, []).append(i)
    mask = np.zeros(len(texts), dtype=bool)
    filled = [0, 0]
    for text in sorted(groups, key=lambda t: (_digest(salt, t), t)):
        side = int(filled[1] < filled[0])
        for i in groups[text]:
            mask[i] = bool(side)
            filled[side] += lengths[i]
    return mask


def resplit_examples(splits: dict[str, list[str]], valid_fraction: float, salt: str) -> dict[str, list[str]]:
    """A target set's examples (both splits pooled) split again: the ``valid_fraction`` of them
    first in hash order become the valid split, the rest the train split (the few-shot pool),
    each in hash order. The demo's targets are halved; evaluating a study on at least 160
    sequences of every target set needs a larger held-out side (HumanEval has 164 problems)."""
    pooled = sorted({text for docs in splits.values() for text in docs}, key=lambda t: (_digest(salt, t), t))
    n_valid = round(valid_fraction * len(pooled))
    return {"train": pooled[n_valid:], "valid": pooled[:n_valid]}


def unigram_counts(docs: list[np.ndarray], vocab_size: int, eod: int) -> np.ndarray:
    """How often each id occurs in ``docs``, EOD's count set to zero."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for d in docs:
        counts += np.bincount(d, minlength=vocab_size)[:vocab_size]
    counts[eod] = 0
    return counts


def noise_documents(
    counts: np.ndarray, n_tokens: int, doc_tokens: int, eod: int, dtype, rng: np.random.Generator
) -> list[np.ndarray]:
    """About ``n_tokens`` tokens drawn i.i.d. with probability proportional to ``counts``, in documents of
    ``doc_tokens`` tokens whose last is EOD. Sampling is by integer inverse CDF, so it is exact."""
    cdf = np.cumsum(counts)
    if cdf[-1] <= 0:
        raise ValueError("the real domains hold no tokens to draw noise from")
    n_docs = max(1, round(n_tokens / doc_tokens))
    draws = np.searchsorted(cdf, rng.integers(0, cdf[-1], size=(n_docs, doc_tokens - 1)), side="right")
    return [np.append(row, eod).astype(dtype) for row in draws]


# --- recipe and build ------------------------------------------------------------------------------


def make_recipe(
    ss: shardset.ShardSet,
    manifest_bytes: bytes,
    *,
    vocab_size: int,
    noise_domains: int,
    noise_tokens: int,
    noise_doc_tokens: int,
    duplicate: str | None,
    max_tokens_per_domain: int | None,
    target_valid_fraction: float | None,
    seed: int,
) -> dict:
    """Everything that decides the bytes of the planted set."""
    import tokenizers

    return {
        "version": VERSION,
        "source": {
            "recipe_hash": ss.recipe_hash,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "shard_sizes": _shard_sizes(ss),
        },
        "bpe": {
            "vocab_size": vocab_size,
            "min_frequency": BPE_MIN_FREQUENCY,
            "eod_token": EOD_TOKEN,
            "pre_tokenizer": "byte-level, GPT-2 regex",
            "tokenizers": tokenizers.__version__,
        },
        "max_train_tokens_per_domain": max_tokens_per_domain,
        "duplicate": duplicate,
        "noise_domains": noise_domains,
        "noise_tokens": noise_tokens,
        "noise_doc_tokens": noise_doc_tokens,
        "target_valid_fraction": target_valid_fraction,
        "seed": seed,
    }


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write(root: Path, rel: str, docs: list[np.ndarray], tok: Tokenizer) -> dict:
    return {"prefix": rel, **indexed.write_indexed(root / rel, docs, dtype=tok.dtype)}


def _text_bytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def _per_token(n_bytes: int, docs: list[np.ndarray]) -> float:
    tokens = sum(int(d.size) - 1 for d in docs)  # EOD is no text
    return round(n_bytes / tokens, 4) if tokens else 0.0


def _build_into(root: Path, ss: shardset.ShardSet, src_meta: dict, recipe: dict, quiet: bool) -> dict:
    """Write every split and ``tokenizer.json`` into ``root``; returns the manifest."""
    vocab_size, cap, dup = recipe["bpe"]["vocab_size"], recipe["max_train_tokens_per_domain"], recipe["duplicate"]
    seed = recipe["seed"]
    real = source_order(src_meta)
    noise = [f"noise_{k}" for k in range(1, recipe["noise_domains"] + 1)]
    dup_name = f"{dup}_dup" if dup else None
    taken = [n for n in [dup_name, *noise] if n and n in real]
    if taken:
        raise ValueError(f"the source already has domains named {taken}")
    if dup and dup not in real:
        raise ValueError(f"duplicate={dup!r} is not a domain of the source; it has {real}")

    t0 = time.perf_counter()
    src_tok = source_tokenizer(ss.root, ss.tokenizer)
    texts: dict[str, dict[str, list[str]]] = {}
    src_tokens: dict[str, int] = {}
    for name in real:
        texts[name] = {}
        for s, sp in ss.domains[name].items():
            texts[name][s], n = decode_split(sp, src_tok)
            if s == "train":
                src_tokens[name] = n
    targets_text = {
        t: {s: decode_split(sp, src_tok)[0] for s, sp in splits.items()} for t, splits in ss.targets.items()
    }
    if recipe["target_valid_fraction"] is not None:
        targets_text = {
            t: resplit_examples(splits, recipe["target_valid_fraction"], salt=f"planted/{seed}/targets/{t}")
            for t, splits in targets_text.items()
        }
    train_texts = [t for name in real for t in texts[name].get("train", [])]
    _log(
        quiet,
        f"[decode] {len(train_texts):,} training documents, {_text_bytes(train_texts) / 1e6:.1f} MB "
        f"of text ({src_tok.name}) in {time.perf_counter() - t0:.1f}s",
    )

    t0 = time.perf_counter()
    hf = train_bpe(train_texts, vocab_size)
    hf.save(str(root / TOKENIZER_FILE), pretty=True)
    tok = load_hf_tokenizer(root / TOKENIZER_FILE, EOD_TOKEN, name=f"bpe-{vocab_size}")
    _log(quiet, f"[bpe] {tok.name} trained in {time.perf_counter() - t0:.1f}s")

    domains: dict[str, dict] = {}
    kept_train: dict[str, list[np.ndarray]] = {}
    kept_bytes = 0
    for name in real:
        t0 = time.perf_counter()
        source_train = texts[name].get("train", [])
        train = kept_train[name] = encode_capped(source_train, tok, cap)
        train_texts_kept = source_train[: len(train)]
        kept_bytes += _text_bytes(train_texts_kept)
        if name == dup:
            mask = duplicate_mask(train_texts_kept, [int(d.size) for d in train], salt=f"planted/{seed}/{dup}")
            copy = [d for d, m in zip(train, mask) if m]
            copy_bytes = _text_bytes([t for t, m in zip(train_texts_kept, mask) if m])
            domains[dup_name] = {
                "kind": "duplicate",
                "duplicate_of": dup,
                "train_bytes": copy_bytes,
                "bytes_per_token": _per_token(copy_bytes, copy),
                "splits": {"train": _write(root, f"{dup_name}/train", copy, tok)},
            }
            train = [d for d, m in zip(train, mask) if not m]
            train_texts_kept = [t for t, m in zip(train_texts_kept, mask) if not m]
        n_bytes = _text_bytes(train_texts_kept)
        splits = {"train": _write(root, f"{name}/train", train, tok)}
        if "valid" in texts[name]:
            splits["valid"] = _write(root, f"{name}/valid", encode_capped(texts[name]["valid"], tok, None), tok)
        domains[name] = {
            "kind": "real",
            "train_bytes": n_bytes,
            "bytes_per_token": _per_token(n_bytes, train),
            "available": {
                "documents": len(source_train),
                "source_tokens": src_tokens.get(name, 0),
                "bytes": _text_bytes(source_train),
            },
            "splits": splits,
        }
        _log(
            quiet,
            f"[tokenize] {name}: {sum(int(d.size) for d in kept_train[name]):,} train tokens in "
            f"{len(kept_train[name]):,} of {len(source_train):,} documents, "
            f"{_per_token(_text_bytes(source_train[: len(kept_train[name])]), kept_train[name]):.2f} "
            f"bytes/token, {time.perf_counter() - t0:.1f}s",
        )

    all_train = [d for name in real for d in kept_train[name]]
    counts = unigram_counts(all_train, tok.vocab_size, tok.eod)
    for k, name in enumerate(noise, start=1):
        rng = np.random.default_rng([seed, k])
        docs = noise_documents(counts, recipe["noise_tokens"], recipe["noise_doc_tokens"], tok.eod, tok.dtype, rng)
        domains[name] = {
            "kind": "noise",
            "seed": [seed, k],
            "splits": {"train": _write(root, f"{name}/train", docs, tok)},
        }
    if noise:
        _log(
            quiet,
            f"[noise] {len(noise)} domains of {domains[noise[0]]['splits']['train']['tokens']:,} tokens "
            f"from the unigram distribution of {int(counts.sum()):,} tokens over "
            f"{int(np.count_nonzero(counts))} ids",
        )

    targets = {}
    for t, splits in targets_text.items():
        targets[t] = {
            "bytes": sum(_text_bytes(v) for v in splits.values()),
            "splits": {
                s: _write(root, f"targets/{t}/{s}", encode_capped(v, tok, None), tok) for s, v in splits.items()
            },
        }
    _log(quiet, f"[targets] {len(targets)} target sets re-tokenized")

    order = [*real, *([dup_name] if dup else []), *noise]
    src_token_total = sum(src_tokens.values())
    src_bytes = sum(d["available"]["bytes"] for n, d in domains.items() if d["kind"] == "real")
    return {
        "tokenizer": tok.identity(),
        "recipe_hash": recipe_hash(recipe),
        "recipe": recipe,
        "description": _DESCRIPTION.format(
            dup=dup_name, orig=dup, noise=", ".join(noise) or "no noise domains", doc=recipe["noise_doc_tokens"]
        ),
        "domain_order": order,
        "planted": {"real": real, "duplicate": {"domain": dup, "copy": dup_name} if dup else None, "noise": noise},
        "bpe": {
            "bytes_per_token": _per_token(kept_bytes, all_train),
            "source_tokenizer": src_tok.identity(),
            "source_bytes_per_token": round(src_bytes / src_token_total, 4) if src_token_total else 0.0,
        },
        "domains": domains,
        "targets": targets,
        "missing": dict(ss.missing),
    }


def build_planted(
    source: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB,
    noise_domains: int = 2,
    noise_tokens: int = 1_000_000,
    noise_doc_tokens: int = NOISE_DOC_TOKENS,
    duplicate: str | None = "code",
    max_tokens_per_domain: int | None = DEFAULT_MAX_TOKENS,
    target_valid_fraction: float | None = DEFAULT_TARGET_VALID,
    seed: int = 0,
    quiet: bool = False,
    force: bool = False,
) -> Path:
    """Build (or find) the planted shard set and return its folder ``<cache>/planted/<recipe-hash[:12]>``.

    - ``source``: folder of the shard set to re-tokenize (any tokenizer :func:`source_tokenizer` can
      open); ``None`` = the demo corpus, built in ``cache_dir`` if it is not there yet.
    - ``cache_dir``: cache root; default :func:`trainer.data.demo.build.default_cache_dir`.
    - ``vocab_size``: ids of the new byte-level BPE, EOD (the last id) included.
    - ``noise_domains``: how many noise domains (``noise_1`` …), 0 for none.
    - ``noise_tokens``: about how many tokens each noise domain holds (rounded to whole documents).
    - ``noise_doc_tokens``: tokens per noise document, EOD included.
    - ``duplicate``: the real domain whose training documents are halved into ``<duplicate>_dup``;
      ``None`` for no duplicate.
    - ``max_tokens_per_domain``: cap on each real domain's training tokens (new tokens, EOD
      included, whole documents; the duplicate's two halves share it); ``None`` = no cap.
      Validation splits and target sets are never capped.
    - ``target_valid_fraction``: share of each target set's examples (both source splits pooled,
      duplicates removed) in its new valid split, the rest in the train split (``resplit_examples``);
      ``None`` keeps the source's splits.
    - ``seed``: seeds the noise draws (``[seed, k]`` for ``noise_k``) and salts the duplicate's split.
    - ``quiet``: no progress lines and no summary table.
    - ``force``: rebuild even if the folder is complete.
    """
    if noise_domains < 0 or noise_tokens <= 0 or noise_doc_tokens < 2:
        raise ValueError(
            f"noise_domains={noise_domains} must be >= 0, noise_tokens={noise_tokens} > 0 and "
            f"noise_doc_tokens={noise_doc_tokens} >= 2"
        )
    if target_valid_fraction is not None and not 0 < target_valid_fraction < 1:
        raise ValueError(f"target_valid_fraction={target_valid_fraction} must be in (0, 1) or None")
    if max_tokens_per_domain is not None and max_tokens_per_domain <= 0:
        raise ValueError(f"max_tokens_per_domain={max_tokens_per_domain} must be positive or None")
    from trainer.data.demo.build import build_demo, default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = Path(source) if source is not None else build_demo(cache, quiet=quiet)
    ss = shardset.ShardSet.load(source)
    manifest_bytes = (Path(source) / shardset.MANIFEST).read_bytes()
    recipe = make_recipe(
        ss,
        manifest_bytes,
        vocab_size=vocab_size,
        noise_domains=noise_domains,
        noise_tokens=noise_tokens,
        noise_doc_tokens=noise_doc_tokens,
        duplicate=duplicate,
        max_tokens_per_domain=max_tokens_per_domain,
        target_valid_fraction=target_valid_fraction,
        seed=seed,
    )
    planted_dir = cache / "planted"
    out = planted_dir / recipe_hash(recipe)[:12]
    if (out / shardset.MANIFEST).is_file() and not force:
        _log(quiet, f"planted shard set {out} is up to date (use --force to rebuild)")
        if not quiet:
            print(format_table(json.loads((out / shardset.MANIFEST).read_text())))
        return out

    t0 = time.perf_counter()
    _log(quiet, f"[planted] building {out} from {source}")
    scratch = planted_dir / f".{out.name}.building{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)  # not mkdtemp: its 0700 mode would stick to the published set
    try:
        meta = _build_into(scratch, ss, json.loads(manifest_bytes), recipe, quiet)
        shardset.write_manifest(scratch, meta)
        if out.exists():
            shutil.rmtree(out)
        try:
            scratch.rename(out)
        except OSError:
            # Another process published the same recipe meanwhile: its bytes equal ours.
            if not (out / shardset.MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _log(quiet, f"planted shard set written to {out} in {time.perf_counter() - t0:.1f}s")
    if not quiet:
        print(format_table(meta))
    return out


def planted_tokenizer(root: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a shard set that ships ``tokenizer.json``, checked against its manifest's identity."""
    root = Path(root)
    return source_tokenizer(root, json.loads((root / shardset.MANIFEST).read_text())["tokenizer"])


# --- report and command line ---------------------------------------------------------------------


def format_table(meta: dict) -> str:
    """Tokens per domain and split, the targets, and the tokenizer's compression."""
    head = f"{'domain':<14} {'kind':<9} {'docs':>7} {'train tokens':>13} {'valid tokens':>13} {'bytes/token':>11}"
    rows = [head, "-" * len(head)]
    order = meta.get("domain_order") or list(meta["domains"])
    total = [0, 0, 0]
    for name in order:
        d = meta["domains"][name]
        tr, va = d["splits"]["train"], d["splits"].get("valid")
        values = [tr["documents"] + (va["documents"] if va else 0), tr["tokens"], va["tokens"] if va else 0]
        total = [a + b for a, b in zip(total, values)]
        bpt = f"{d['bytes_per_token']:.2f}" if d.get("bytes_per_token") else "-"
        valid = f"{values[2]:,}" if va else "-"
        rows.append(f"{name:<14} {d.get('kind', ''):<9} {values[0]:>7,} {values[1]:>13,} {valid:>13} {bpt:>11}")
    rows.append("-" * len(head))
    rows.append(f"{'total':<14} {'':<9} {total[0]:>7,} {total[1]:>13,} {total[2]:>13,}")
    rows.append("")
    rows.append(f"{'target':<14} {'train ex.':>9} {'valid ex.':>9} {'train tokens':>13} {'valid tokens':>13}")
    for name, t in meta.get("targets", {}).items():
        tr, va = t["splits"].get("train", {}), t["splits"].get("valid", {})
        rows.append(
            f"{name:<14} {tr.get('documents', 0):>9,} {va.get('documents', 0):>9,} "
            f"{tr.get('tokens', 0):>13,} {va.get('tokens', 0):>13,}"
        )
    bpe = meta.get("bpe", {})
    if bpe:
        src = bpe.get("source_tokenizer", {}).get("name", "source")
        rows.append("")
        rows.append(
            f"tokenizer {meta['tokenizer']['name']}: {bpe['bytes_per_token']:.2f} bytes/token on the kept "
            f"real training text ({src}: {bpe['source_bytes_per_token']:.2f} on all of it)"
        )
    for name, reason in meta.get("missing", {}).items():
        rows.append(f"MISSING {name}: {reason}")
    return "\n".join(rows)


def _run(args: argparse.Namespace) -> int:
    path = build_planted(
        args.source,
        args.cache_dir,
        vocab_size=args.vocab,
        noise_domains=args.noise_domains,
        noise_tokens=args.noise_tokens,
        duplicate=args.duplicate or None,
        max_tokens_per_domain=args.max_tokens_per_domain or None,
        target_valid_fraction=args.target_valid or None,
        seed=args.seed,
        force=args.force,
    )
    print(path)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``planted`` subcommand to an argparse subparsers object; its ``func`` runs the build."""
    parser = subparsers.add_parser(
        "planted",
        help="build the quality study's shard set: small BPE, a duplicate domain and noise domains",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="shard set to re-tokenize (default: the demo corpus, built if missing)",
    )
    parser.add_argument(
        "--cache",
        "--cache-dir",
        dest="cache_dir",
        type=Path,
        default=None,
        help="cache root (default: $MIXTRAIN_CACHE, else ./.cache/mixtrain)",
    )
    parser.add_argument(
        "--vocab", type=int, default=DEFAULT_VOCAB, help=f"BPE vocabulary, EOD included (default: {DEFAULT_VOCAB})"
    )
    parser.add_argument("--noise-domains", type=int, default=2, help="noise domains (default: 2)")
    parser.add_argument(
        "--noise-tokens", type=int, default=1_000_000, help="tokens per noise domain (default: 1,000,000)"
    )
    parser.add_argument(
        "--target-valid",
        type=float,
        default=DEFAULT_TARGET_VALID,
        help="share of each target set's examples in its valid split; 0 keeps the source's "
        f"splits (default: {DEFAULT_TARGET_VALID:.3f})",
    )
    parser.add_argument(
        "--duplicate", default="code", help="domain halved into <name>_dup; empty for none (default: code)"
    )
    parser.add_argument(
        "--max-tokens-per-domain",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"cap on each real domain's train tokens; 0 = no cap (default: {DEFAULT_MAX_TOKENS:,})",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise draws and duplicate split (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the shard set exists")
    parser.set_defaults(func=_run)
    return parser
