"""train.init_from (a new run from another run's weights only) and train.extend (a run continued
past its train.steps), each recorded in the run's lineage; refused changes name what may change."""

import json
import shutil

import pytest
import torch
from helpers import make_shardset, tiny_config

from trainer import checkpoint, engines, safe_load
from trainer.config import ConfigError
from trainer.loop import Loop
from trainer.schedule import lr_at


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("warm") / "data")


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 6-step run, trained to the end."""
    run_dir = tmp_path_factory.mktemp("warm") / "base"
    Loop(tiny_config(data, run_dir, **{"train.steps": 6})).train()
    return run_dir


def _lineage(run_dir) -> list[dict]:
    return safe_load.load(checkpoint.latest(run_dir / "checkpoints") / checkpoint.STATE_FILE)["loop"]["lineage"]


def test_init_from_takes_the_weights_and_nothing_else(data, finished, tmp_path):
    source = checkpoint.latest(finished / "checkpoints")
    weights = engines.read_checkpoint(source)[0]["engine"]["model"]
    new_mix = {"name": "static", "weights": {"abc": 0.7, "counting": 0.1, "noise": 0.1, "words": 0.1}}
    loop = Loop(
        tiny_config(data, tmp_path / "b", **{"train.steps": 4, "train.init_from": str(finished), "mixture": new_mix})
    )
    for k, v in loop.engine.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert loop.step == 0 and not loop.engine.optimizer.state  # a fresh optimizer and step counter
    loop.train()
    [event] = _lineage(tmp_path / "b")
    assert event["event"] == "init_from" and event["at_step"] == 0 and event["its_step"] == 6
    assert event["run_id"] == (finished / "run_id.txt").read_text().strip()
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["mixture/weight/abc"] == pytest.approx(0.7)


def test_init_from_refuses_another_model_or_engine(data, finished, tmp_path):
    with pytest.raises(
        ConfigError, match=r"holds another model; differing knobs: model.d_model: checkpoint 32 vs now 64"
    ):
        Loop(tiny_config(data, tmp_path / "c", **{"train.init_from": str(finished), "model.d_model": 64}))
    with pytest.raises(ConfigError, match="neither a checkpoint directory"):
        Loop(tiny_config(data, tmp_path / "d", **{"train.init_from": str(tmp_path)}))
    with pytest.raises(ConfigError, match="train.init_from applies to engine.name torch or fsdp"):
        tiny_config(data, tmp_path / "e", **{"train.init_from": str(finished), "engine.name": "deepspeed"})
    assert not (tmp_path / "c").exists()
    megatron = tmp_path / "megatron"  # read_checkpoint gives megatron-core's parameter names for these
    shutil.copytree(checkpoint.latest(finished / "checkpoints"), megatron)
    meta = json.loads((megatron / "meta.json").read_text())
    (megatron / "meta.json").write_text(json.dumps({**meta, "engine": {"name": "megatron", "tensor_parallel": 1}}))
    with pytest.raises(ConfigError, match="holds megatron's model"):
        Loop(tiny_config(data, tmp_path / "f", **{"train.init_from": str(megatron)}))


def test_a_finished_run_is_extended_only_when_asked(data, tmp_path):
    finished = tmp_path / "run"  # its own run: the extension changes it
    Loop(tiny_config(data, finished, **{"train.steps": 6})).train()
    with pytest.raises(checkpoint.CheckpointMismatch) as refused:
        Loop(tiny_config(data, finished, **{"train.steps": 10}))
    assert "train.steps: checkpoint 6 vs now 10" in str(refused.value)
    assert "train.steps with train.extend=true" in str(refused.value)  # what may change, and how
    assert "train.init_from=" in str(refused.value)
    cfg = tiny_config(data, finished, **{"train.steps": 10, "train.extend": True})
    loop = Loop(cfg)
    assert loop.step == 6
    loop.train()
    assert loop.step == 10
    [event] = _lineage(finished)
    assert event == {"event": "extended", "steps_before": 6, "steps": 10, "at_step": 6}
    records = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(lr) == list(range(10))  # every step once: steps 6-9 appended to the finished run's log
    assert lr[6] == pytest.approx(lr_at(6, cfg.train))  # the new schedule from the resumed step on
    with pytest.raises(ConfigError, match="below the checkpoint's step 10"):
        Loop(tiny_config(data, finished, **{"train.steps": 8, "train.extend": True}))
