"""A shard set: a folder of Megatron prefixes plus ``manifest.json`` describing them.

Layout (prefixes are relative to the folder)::

    manifest.json
    <domain>/train.{bin,idx}   <domain>/valid.{bin,idx}
    targets/<name>/train.{bin,idx}  targets/<name>/valid.{bin,idx}
    tokenizer.json  tokenizer_config.json      # a Hugging Face tokenizer's copy, when the set has one

``manifest.json``::

    {"format": "mixtrain-shards/1",
     "tokenizer": {"name", "vocab_size", "eod", "files": {file: sha256}},
     "recipe_hash": "...",                      # hash of whatever built it (cache key)
     "domains": {name: {"splits": {"train": {"prefix", "documents", "tokens"}, "valid": {...}},
                        "sources": [...], ...}},
     "targets": {name: {"splits": {"train": {...}, "valid": {...}}, ...}},   # few-shot pool / held-out eval
     "missing": {name: "why it could not be built"},
     "domain_order": [name, ...]}               # optional: the domains' order (the keys above are sorted)

Absolute prefixes are allowed (existing Megatron data used in place). The demo builder
(``trainer.data.demo``) and ``mixtrain data ingest`` both write this; the trainer reads it, or
takes bare Megatron prefixes named in the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "mixtrain-shards/1"
MANIFEST = "manifest.json"


@dataclass
class Split:
    prefix: str  # absolute
    documents: int = 0
    tokens: int = 0
    max_token: int | None = None  # largest id, recorded at build/ingest (None in older manifests)


@dataclass
class ShardSet:
    root: Path
    tokenizer: dict
    domains: dict[str, dict[str, Split]]  # domain -> split name -> Split
    targets: dict[str, dict[str, Split]] = field(default_factory=dict)  # same shape as domains
    missing: dict[str, str] = field(default_factory=dict)
    recipe_hash: str = ""

    @classmethod
    def load(cls, root: str | os.PathLike) -> ShardSet:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"data.path={str(root)!r} holds no {MANIFEST}: build it with `mixtrain data demo` or `mixtrain data "
                "ingest`"
            )
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")

        def split(d):
            top = d.get("max_token")
            return Split(
                prefix=str(root / d["prefix"]),
                documents=int(d.get("documents", 0)),
                tokens=int(d.get("tokens", 0)),
                max_token=None if top is None else int(top),
            )

        # The manifest is written with sorted keys; "domain_order", when given, is the intended order.
        order = [d for d in meta.get("domain_order", []) if d in meta["domains"]]
        order += [d for d in meta["domains"] if d not in order]
        domains = {name: {s: split(v) for s, v in meta["domains"][name]["splits"].items()} for name in order}
        targets = {name: {s: split(v) for s, v in d["splits"].items()} for name, d in meta.get("targets", {}).items()}
        return cls(
            root=root,
            tokenizer=meta["tokenizer"],
            domains=domains,
            targets=targets,
            missing=dict(meta.get("missing", {})),
            recipe_hash=meta.get("recipe_hash", ""),
        )


def write_manifest(root: str | os.PathLike, meta: dict) -> Path:
    """Write ``manifest.json`` atomically; it is written last, so its presence means the set is complete."""
    root = Path(root)
    meta = {"format": FORMAT, **meta}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST
