"""The proxy → main workflow end to end on a tiny model: `mixtrain search mixture=doge` learns and
exports weights (weights.json + blend.txt); a larger main model trains on them through
`mixture=static mixture.weights_from=<search run>`, and through the YAML `mixtrain export` writes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, make_shardset, tiny_config

from trainer.commands.export import main as export_main
from trainer.data.sampler import largest_remainder
from trainer.loop import Loop
from trainer.tracking import read_jsonl

DATA = [
    "data=shards",
    "data.tokenizer=bytes",
    "data.seq_len=32",
    "data.steps_per_shard=3",
    "data.eval_sequences=4",
    "train.micro_batch=4",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "engine.threads=1",
    "run.progress=false",
    "run.wandb=disabled",
    "run.plots=false",
]
SHARD = 3 * 4  # sequences per shard: steps_per_shard x micro_batch (tiny_config has the same)


def _mixtrain(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _weights_used(run_dir, domains) -> np.ndarray:
    """mixture/weight/<d> of every training step: [steps, K]."""
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    return np.array([[r[f"mixture/weight/{d}"] for d in domains] for r in recs])


def _check_main_run(run_dir, exported: np.ndarray, domains, steps: int) -> None:
    target = exported / exported.sum()
    used = _weights_used(run_dir, domains)
    assert used.shape == (steps, len(domains))
    assert np.abs(used - target).max() <= 1e-12  # every step sampled with the search's weights
    saved = json.loads((run_dir / "weights.json").read_text())
    assert saved["controller"] == "static"
    assert np.abs(np.array([saved["train_domain_weights"][d] for d in domains]) - target).max() <= 1e-12
    shards = [r for r in read_jsonl(run_dir / "weights.jsonl") if "shard" in r]
    assert len(shards) == steps // 3
    for r in shards:  # and the sampler drew exactly those proportions
        assert [r["counts"][d] for d in domains] == largest_remainder(target, SHARD).tolist()


@pytest.mark.slow  # the default suite stays under 10 minutes
@pytest.mark.timeout(120)
def test_search_then_main_run_on_the_exported_weights(tmp_path):
    data = make_shardset(tmp_path / "data")
    # 1. the proxy search: DoGE (universal) on a tiny proxy; μ sized for 15 steps of a 40k-parameter model
    proc = _mixtrain(
        [
            "search",
            "mixture=doge",
            "mixture.mu=0.02",
            "model.d_model=32",
            "model.max_seq_len=64",
            "train.steps=15",
            f"data.path={data}",
            *DATA,
        ],
        tmp_path,
    )
    (search,) = (tmp_path / "runs").glob("search-doge-*")
    assert "exported" in proc.stdout and f"mixture.weights_from={search}" in proc.stdout
    obj = json.loads((search / "weights.json").read_text())
    assert obj["controller"] == "doge" and obj["steps"] == 15
    domains = list(obj["train_domain_weights"])
    assert sorted(domains) == ["abc", "counting", "noise", "words"]
    exported = np.array([obj["train_domain_weights"][d] for d in domains])
    assert exported.sum() == pytest.approx(1.0) and np.abs(exported - 0.25).max() > 0.02  # DoGE moved the weights
    blend = (search / "blend.txt").read_text().split()
    assert [float(w) for w in blend[0::2]] == pytest.approx(exported, abs=1e-6)
    assert blend[1::2] == [str(data / d / "train") for d in domains]
    search_cfg = (search / "config.yaml").read_text()
    assert "d_model: 32" in search_cfg

    # 2. the main run: a larger model (model=small: 4 layers, width 256) on the exported mixture
    _mixtrain(
        [
            "train",
            "model=small",
            "mixture=static",
            f"mixture.weights_from={search}",
            "train.steps=6",
            "run.name=main",
            f"data.path={data}",
            *DATA,
        ],
        tmp_path,
    )
    (main,) = (tmp_path / "runs").glob("main-*")
    assert "d_model: 256" in (main / "config.yaml").read_text()
    _check_main_run(main, exported, domains, steps=6)

    # 3. the same through `mixtrain export --format yaml` (the file a user keeps or edits)
    yaml_file = tmp_path / "doge_weights.yaml"
    assert export_main([str(search), "--format", "yaml", "--out", str(yaml_file)]) == 0
    cfg = tiny_config(
        data,
        tmp_path / "main_yaml",
        **{
            "model": {"n_layer": 3, "n_head": 2, "d_model": 48, "max_seq_len": 64},
            "train.steps": 6,
            "train.eval_every": 0,
            "mixture": {"name": "static", "weights_from": str(yaml_file)},
        },
    )
    result = Loop(cfg).train()
    assert result.domains == domains
    _check_main_run(tmp_path / "main_yaml", exported, domains, steps=6)
