"""Shared test helpers: tiny synthetic shard sets and configs that train in seconds on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from trainer.config import load_config
from trainer.data.indexed import write_indexed
from trainer.data.shardset import write_manifest
from trainer.data.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent


def synthetic_text(kind: str, n_docs: int, rng: np.random.Generator) -> list[str]:
    """Texts with clearly different statistics per kind (learnable patterns vs noise)."""
    docs = []
    for _ in range(n_docs):
        if kind == "counting":
            start = int(rng.integers(0, 50))
            docs.append(" ".join(str(i) for i in range(start, start + 60)))
        elif kind == "abc":
            docs.append("abcdefgh" * int(rng.integers(20, 40)))
        elif kind == "words":
            vocab = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far"]
            docs.append(" ".join(rng.choice(vocab, size=80)))
        elif kind == "noise":
            docs.append(bytes(rng.integers(32, 127, size=300, dtype=np.uint8)).decode("ascii"))
        else:
            raise ValueError(kind)
    return docs


def train_tokenizer(
    path: Path, vocab_size: int = 320, special: tuple[str, ...] = ("<|endoftext|>",), seed: int = 0
) -> Path:
    """A byte-level BPE trained here with the ``tokenizers`` library on ~30 KB of synthetic text
    (a few hundred ms), saved as ``path`` (a ``tokenizer.json``); ``special`` tokens take the last ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(seed)
    texts = [t for kind in ("counting", "words", "noise") for t in synthetic_text(kind, 40, rng)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(special))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def make_shardset(
    root: Path,
    kinds: dict[str, str] | None = None,
    n_docs: int = 40,
    targets: dict[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """A shard set with the bytes tokenizer: domain name -> text kind."""
    kinds = kinds or {"counting": "counting", "abc": "abc", "words": "words", "noise": "noise"}
    targets = targets if targets is not None else {"wordy": "words"}
    tok = get_tokenizer("bytes")
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def write(prefix: str, texts: list[str]) -> dict:
        docs = [np.array(tok.encode(t) + [tok.eod], dtype=tok.dtype) for t in texts]
        info = write_indexed(root / prefix, docs, dtype=tok.dtype)
        return {"prefix": prefix, **info}

    domains = {
        name: {
            "splits": {
                "train": write(f"{name}/train", synthetic_text(k, n_docs, rng)),
                "valid": write(f"{name}/valid", synthetic_text(k, 4, rng)),
            }
        }
        for name, k in kinds.items()
    }
    tgts = {
        name: {
            "splits": {
                "train": write(f"targets/{name}/train", synthetic_text(k, 4, rng)),
                "valid": write(f"targets/{name}/valid", synthetic_text(k, 4, rng)),
            }
        }
        for name, k in targets.items()
    }
    write_manifest(
        root,
        {"tokenizer": tok.identity(), "recipe_hash": "synthetic", "domains": domains, "targets": tgts, "missing": {}},
    )
    return root


def tiny_values(data_path: Path, run_dir: Path, **overrides) -> dict:
    """A plain config dict for a fast run on a synthetic shard set; dotted overrides allowed."""
    values = {
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64},
        "data": {
            "source": "path",
            "path": str(data_path),
            "tokenizer": "bytes",
            "seq_len": 32,
            "steps_per_shard": 3,
            "eval_sequences": 4,
        },
        "train": {
            "steps": 8,
            "micro_batch": 4,
            "grad_accum": 1,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "eval_every": 4,
        },
        "engine": {"threads": 1},
        "run": {"dir": str(run_dir), "wandb": "disabled", "plots": False, "progress": False},
        "mixture": {"name": "uniform"},
    }
    for key, value in overrides.items():
        node = values
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return values


TINY_LLAMA = {
    "name": "llama",
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "d_model": 32,
    "max_seq_len": 64,
    "bias": False,
}
"""The Llama family at tiny_values' size: grouped-query attention (4 query heads on 2 key/value
heads), no biases, tied head."""


def two_rank_values(data_path: Path, run_dir: Path, engine: dict, mixture: dict, **overrides) -> dict:
    """20 steps of 2 ranks x 2 micro-batches x 2 sequences, shards of 4 steps, an evaluation and a
    checkpoint every 5 (the multi-rank engine parity and resume tests' layout)."""
    return tiny_values(
        data_path,
        run_dir,
        **{
            "train.steps": 20,
            "train.micro_batch": 2,
            "train.grad_accum": 2,
            "train.eval_every": 5,
            "train.checkpoint_every": 5,
            "data.steps_per_shard": 4,
            "engine": {"threads": 1, **engine},
            "mixture": mixture,
            **overrides,
        },
    )


FAR_TRAINED = {"train.steps": 30, "train.lr": 3e-2, "train.min_lr": 3e-3, "train.eval_every": 0}
"""tiny_values overrides for a model far from its initialisation (large steps: logits up to ~5, far
from linear), for tests that compare what it computes elsewhere (an export, an evaluation)."""


def cli_status(argv: list[str]) -> int:
    """``mixtrain ARGV`` in this process; its exit status."""
    from trainer import cli

    try:
        cli.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def tiny_config(data_path: Path, run_dir: Path, **overrides):
    return load_config(tiny_values(data_path, run_dir, **overrides))


def run_torchrun(nproc: int, script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with gloo on CPU; raises with the output on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def losses_by_step(run_dir: Path) -> dict[int, dict]:
    """step -> {key: value} for the deterministic keys of metrics.jsonl (no timings, no run id); the
    training and evaluation records of one step are merged."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        kept = {k: v for k, v in rec.items() if not k.startswith("perf/") and k != "run_id"}
        out.setdefault(rec["step"], {}).update(kept)
    return out


TINY_CLI = [
    "data=shards",
    "data.tokenizer=bytes",
    "data.seq_len=32",
    "data.steps_per_shard=2",
    "data.eval_sequences=4",
    "model.d_model=32",
    "model.max_seq_len=64",
    "train.steps=4",
    "train.micro_batch=4",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "engine.threads=1",
    "run.progress=false",
]
"""A tiny CLI run on a bytes-tokenized shard set (add data.path=…)."""

DGA_IN_BATCH = {
    "name": "dga",
    "target": "target:wordy",
    "update_every": 2,
    "mu": 0.003,
    "ema": 0.5,
    "source": "in_batch",
    "target_sequences": 4,
}
"""DGA with the probe in the training backward, a step every 2 (the multi-rank parity runs)."""
