"""Resolve the data config into domains: per-domain token streams cut into training sequences."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError, DataConfig
from .indexed import IndexedTokens, exists
from .sampler import rank_slice
from .shardset import ShardSet
from .tokenizer import Tokenizer, TokenizerError
from .tokenizer_options import load_tokenizer


@dataclass
class SequenceView:
    """A token stream cut into samples of seq_len + 1 tokens (inputs and shifted targets).

    Sample j starts at token j * seq_len: consecutive samples share one boundary token, so every
    token is predicted exactly once per epoch. Documents are packed back to back with EOD between.
    """

    stream: IndexedTokens
    seq_len: int

    def __len__(self) -> int:
        return max(0, (self.stream.num_tokens - 1) // self.seq_len)

    def get(self, indices) -> np.ndarray:
        toks = self.stream.tokens
        L = self.seq_len
        out = np.empty((len(indices), L + 1), dtype=np.int64)
        for row, j in enumerate(indices):
            out[row] = toks[int(j) * L : int(j) * L + L + 1]
        return out

    def eval_indices(self, n: int) -> np.ndarray:
        """n samples spread evenly over the stream: a fixed evaluation set."""
        size = len(self)
        return np.unique(np.linspace(0, size - 1, num=min(n, size)).astype(np.int64))


@dataclass
class DataBundle:
    domains: list[str]
    train: list[SequenceView]
    valid: dict[str, SequenceView]
    targets: dict[str, dict[str, SequenceView]] = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    root: str = ""
    reference: list[np.ndarray] | None = None
    """Per domain, the sample indices of its reference slice (``trainer.data.reference``), set by
    the loop when the controller steers on held-out data; None otherwise."""

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def views(self):
        """(``domain/split`` or ``target:name/split``, view) for every split a run reads."""
        for d, v in zip(self.domains, self.train):
            yield f"{d}/train", v
        for d, v in self.valid.items():
            yield f"{d}/valid", v
        for t, splits in self.targets.items():
            for s, v in splits.items():
                yield f"target:{t}/{s}", v

    @property
    def train_tokens(self) -> np.ndarray:
        return np.array([v.stream.num_tokens for v in self.train], dtype=np.float64)

    @property
    def train_samples(self) -> np.ndarray:
        return np.array([len(v) for v in self.train], dtype=np.int64)

    def step_rows(self, plan, pos: int, global_batch: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows of the optimizer step that starts at position ``pos`` of a shard plan:
        tokens [b, seq_len + 1] and the domain of each row, in plan order."""
        sl = rank_slice(pos, global_batch, rank, world)
        doms, idxs = plan.domains[sl].astype(np.int64), plan.indices[sl]
        tokens = None
        for d in np.unique(doms):
            rows = np.flatnonzero(doms == d)
            got = self.train[d].get(idxs[rows])
            if tokens is None:
                tokens = np.empty((doms.size, got.shape[1]), dtype=np.int64)
            tokens[rows] = got
        return tokens, doms


def _tokenizer(cfg: DataConfig) -> Tokenizer:
    try:
        return load_tokenizer(cfg.tokenizer, cfg.eod_token, knob="data.tokenizer", eod_knob="data.eod_token")
    except TokenizerError as e:
        raise ConfigError(str(e)) from None


def _shardset(cfg: DataConfig, quiet: bool) -> ShardSet:
    if cfg.source == "demo":
        from .demo import build_demo

        built = build_demo(
            cfg.cache_dir, tokenizer=_tokenizer(cfg), max_tokens_per_domain=cfg.max_tokens_per_domain, quiet=quiet
        )
        return ShardSet.load(built)
    path = Path(cfg.path)
    if not path.exists():
        raise ConfigError(f"data.path={cfg.path!r} does not exist")
    return ShardSet.load(path)


def _prefix_splits(cfg: DataConfig) -> dict[str, dict[str, str]]:
    out = {}
    for name, spec in cfg.prefixes.items():
        splits = {"train": spec} if isinstance(spec, str) else dict(spec)
        if "train" not in splits:
            raise ConfigError(f"data.prefixes.{name} needs a 'train' prefix")
        for split, prefix in splits.items():
            if not exists(prefix):
                raise ConfigError(f"data.prefixes.{name}.{split}={prefix!r}: no {prefix}.bin/.idx pair")
        out[name] = splits
    return out


def _select(names: list[str], wanted, knob: str) -> list[str]:
    if wanted is None:
        return names
    unknown = [d for d in wanted if d not in names]
    if unknown:
        raise ConfigError(f"{knob} names unknown {unknown}; available: {names}")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"{knob} lists a name twice: {list(wanted)}")
    return list(wanted)


def load_data(cfg: DataConfig, *, quiet: bool = False) -> DataBundle:
    """Open every domain named by the config (building the demo corpus first if it is missing)."""
    if cfg.source == "prefixes":
        splits = {d: {s: (p, None, None) for s, p in v.items()} for d, v in _prefix_splits(cfg).items()}
        tokenizer = _tokenizer(cfg).identity()
        target_splits: dict = {}
        root = ""
    else:
        ss = _shardset(cfg, quiet)
        # A manifest's token count bounds its split: ingest may carve a valid split off the end
        # of an existing Megatron prefix and use the front of it, in place, for training.
        splits = {
            d: {s: (sp.prefix, sp.tokens or None, sp.max_token) for s, sp in v.items()} for d, v in ss.domains.items()
        }
        target_splits = {
            t: {s: (sp.prefix, sp.tokens or None, sp.max_token) for s, sp in v.items()} for t, v in ss.targets.items()
        }
        tokenizer = ss.tokenizer
        root = str(ss.root)
    names = _select(list(splits), cfg.domains, "data.domains")
    train, valid = [], {}
    for d in names:
        view = SequenceView(IndexedTokens(*splits[d]["train"]), cfg.seq_len)
        if len(view) == 0:
            raise ConfigError(
                f"domain {d!r} is empty: {view.stream.num_tokens} tokens, a sample needs data.seq_len + 1 = "
                f"{cfg.seq_len + 1}"
            )
        train.append(view)
        if "valid" in splits[d]:
            v = SequenceView(IndexedTokens(*splits[d]["valid"]), cfg.seq_len)
            if len(v):
                valid[d] = v
    targets = {}
    for t in _select(sorted(target_splits), cfg.targets, "data.targets"):
        views = {s: SequenceView(IndexedTokens(*p), cfg.seq_len) for s, p in target_splits[t].items()}
        views = {s: v for s, v in views.items() if len(v)}
        if views:
            targets[t] = views
    return DataBundle(domains=names, train=train, valid=valid, targets=targets, tokenizer=tokenizer, root=root)


def check_vocab(bundle: DataBundle, model_vocab: int) -> None:
    """Refuse data whose token ids do not fit the model's embedding (named knob: model.vocab_size),
    before step 0: every split a run reads, by the largest id its manifest recorded, else scanned
    once (bare prefixes, older manifests)."""
    if bundle.vocab_size > model_vocab:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the data tokenizer's vocabulary "
            f"{bundle.vocab_size} ({bundle.tokenizer.get('name')}); raise it or set it to null"
        )
    for name, view in bundle.views():
        top = view.stream.max_token()
        if top >= bundle.vocab_size:
            raise ConfigError(
                f"data: {name} ({view.stream.prefix}) holds token id {top}, beyond the "
                f"{bundle.vocab_size} ids of its tokenizer {bundle.tokenizer.get('name')} "
                f"(model.vocab_size={model_vocab}): it was tokenized with another vocabulary; "
                "re-ingest it, or declare the tokenizer it was made with (data.tokenizer)"
            )


_EDGE = 256 << 10


def shard_fingerprint(bundle: DataBundle) -> dict[str, str]:
    """Per split a run reads, the sizes of its .bin/.idx and a hash of their first and last 256 KiB:
    cheap, and enough to tell re-ingested or replaced data from what a checkpoint was trained on."""
    out = {}
    for name, view in bundle.views():
        h = hashlib.blake2b(digest_size=8)
        sizes = []
        for path in (view.stream.prefix + ".bin", view.stream.prefix + ".idx"):
            size = os.path.getsize(path)
            sizes.append(size)
            with open(path, "rb") as f:
                h.update(f.read(_EDGE))
                if size > 2 * _EDGE:
                    f.seek(size - _EDGE)
                    h.update(f.read())
        out[name] = f"{sizes[0]}+{sizes[1]} bytes, {h.hexdigest()}"
    return out
