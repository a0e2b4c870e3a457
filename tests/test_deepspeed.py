"""engine=deepspeed: the same training as engine=torch under ZeRO 0-3 on 2 gloo ranks.

- the first 20 per-step losses (overall and per domain), the probe's alignments (DGA, probe inside
  the training backward, reference gradient through the unwrapped model) and the evaluation losses
  match engine=torch within 1e-4; the shard weights and their sample counts follow the same path;
- every rank holds bit-identical domain weights at every shard boundary and identical parameters;
- a run killed mid-shard (train.fail_at_step) and resumed from DeepSpeed's own checkpoint replays
  exactly: the same metrics, weights and final parameters as the uninterrupted run;
- at the Engine contract (one process, tests/scripts/ds_engine_step.py): per-domain loss weights,
  accumulation, clipping, gradient norm, probe alignments and norms, on_losses, load_state_dict;
- knob validation, the ds_config built from them, checkpoint layout, atomicity and engine mismatch.

ZeRO-3 runs both ways: with engine.deepspeed.zero3_whole_params=true ("3") and with DeepSpeed's own
partitioned parameters ("3p", the default): the probe reads their full shapes (ds_shape), so gradient
controllers match engine=torch there too. Only nvme-offloaded partitioned parameters refuse gradient
signals (untested), with a ConfigError naming the knobs.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import DGA_IN_BATCH, REPO, losses_by_step, make_shardset, run_torchrun, two_rank_values

from trainer import checkpoint, engines
from trainer.config import ConfigError, DeepSpeedConfig, EngineConfig, TrainConfig, load_config
from trainer.engines.deepspeed_engine import build_ds_config

SCRIPT = REPO / "tests" / "scripts" / "run_config.py"
STEP_SCRIPT = REPO / "tests" / "scripts" / "ds_engine_step.py"
REL = 1e-4
DGA = DGA_IN_BATCH
ZERO = {
    0: {"deepspeed": {"zero_stage": 0}},
    1: {"deepspeed": {"zero_stage": 1}},
    2: {"deepspeed": {"zero_stage": 2}},
    3: {"deepspeed": {"zero_stage": 3, "zero3_whole_params": True}},
    "3p": {"deepspeed": {"zero_stage": 3}},
}  # 3p: partitioned parameters (engine.deepspeed.zero3_whole_params=false)


def _values(data, run_dir, engine: dict, mixture=None, **extra):
    return two_rank_values(data, run_dir, engine, mixture or DGA, **extra)


def _launch(values: dict, cfg_path):
    cfg_path.write_text(json.dumps(values))
    return run_torchrun(2, SCRIPT, str(cfg_path))


def _ranks(run_dir) -> list[dict]:
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """torch and deepspeed ZeRO 0-3 (3 twice: whole and partitioned parameters) on the same data and
    config (DGA, probe in the training backward)."""
    root = tmp_path_factory.mktemp("ds")
    data = make_shardset(root / "data")
    out = {"root": root, "data": data}
    for name, engine in [("torch", {})] + [(f"zero{z}", {"name": "deepspeed", **e}) for z, e in ZERO.items()]:
        proc = _launch(_values(data, root / name, engine), root / f"{name}.json")
        assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
        out[name] = root / name
    return out


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= REL * scale


@pytest.mark.parametrize("stage", [0, 1, 2, 3, "3p"])
def test_losses_alignments_and_weights_match_torch(runs, stage):
    ref, got = losses_by_step(runs["torch"]), losses_by_step(runs[f"zero{stage}"])
    assert got.keys() == ref.keys() and len([s for s in ref if "train/loss" in ref[s]]) == 20
    aligned = 0
    for step, rec in ref.items():
        assert got[step].keys() == rec.keys(), step
        align = {k: v for k, v in rec.items() if k.startswith("probe/align/")}
        align_scale = max((abs(v) for v in align.values()), default=0.0)
        for key, v in rec.items():
            if key.startswith(("train/loss", "eval/", "target/")):
                assert _close(got[step][key], v, abs(v)), (step, key, got[step][key], v)
            elif key in align:  # relative to the step's largest alignment (single ones can be ~0)
                assert _close(got[step][key], v, align_scale), (step, key, got[step][key], v)
                aligned += 1
            elif key.startswith("mixture/weight/") or key == "lr":
                assert _close(got[step][key], v, 1.0), (step, key)
            elif key == "train/grad_norm":
                assert _close(got[step][key], v, abs(v)), (step, key)
    assert aligned >= 9 * 3  # the probe measured on the update steps
    ref_hist, got_hist = _ranks(runs["torch"])[0]["history"], _ranks(runs[f"zero{stage}"])[0]["history"]
    assert [h["counts"] for h in got_hist] == [h["counts"] for h in ref_hist]  # the same samples were drawn
    assert len({json.dumps(h["weights"]) for h in ref_hist}) > 3  # the weights moved


@pytest.mark.parametrize("stage", [0, 1, 2, 3, "3p"])
def test_every_rank_holds_the_same_weights_and_parameters(runs, stage):
    ranks = _ranks(runs[f"zero{stage}"])
    assert ranks[0]["history"] == ranks[1]["history"]  # bit-identical at every shard boundary
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert ranks[0]["step"] == 20


def _check_resumed(run_dir, ref_dir, proc, at: int):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and f"at step {at}" in proc.stdout
    assert losses_by_step(run_dir) == losses_by_step(ref_dir)  # bit-exact: every loss, alignment, weight, eval
    n_lines = [len((d / "metrics.jsonl").read_text().splitlines()) for d in (run_dir, ref_dir)]
    assert n_lines[0] == n_lines[1]
    run_ranks, ref_ranks = _ranks(run_dir), _ranks(ref_dir)
    for r in range(2):
        assert run_ranks[r]["history"] == ref_ranks[0]["history"]
        assert run_ranks[r]["params_sha256"] == ref_ranks[0]["params_sha256"]
    assert (run_dir / "weights.jsonl").read_text() == (ref_dir / "weights.jsonl").read_text()


def _crash_and_resume(runs, name: str, engine: dict, mixture=None, ref_dir=None):
    root, data = runs["root"], runs["data"]
    run_dir = root / f"{name}_resumed"
    crashed = _launch(_values(data, run_dir, engine, mixture, **{"train.fail_at_step": 12}), root / f"{name}_a.json")
    assert crashed.returncode != 0  # os._exit(17) on every rank
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest.json", "step_00000005", "step_00000010"], names
    assert (run_dir / "checkpoints" / "step_00000010" / "deepspeed" / "model").is_dir()
    resumed = _launch(_values(data, run_dir, engine, mixture), root / f"{name}_b.json")
    _check_resumed(run_dir, ref_dir or runs[name], resumed, at=10)  # mid-shard: shard 2 covers steps 8-11


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_resume_zero3_is_exact(runs):
    """ZeRO-3 (whole parameters, DGA with the probe): partitioned gradients and optimizer states."""
    _crash_and_resume(runs, "zero3", {"name": "deepspeed", **ZERO[3]})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_resume_is_exact(runs, stage):
    _crash_and_resume(runs, f"zero{stage}", {"name": "deepspeed", **ZERO[stage]})


@pytest.mark.slow
def test_partitioned_zero3_loss_only_matches_and_resumes(runs):
    """DeepSpeed's own ZeRO-3 (parameters partitioned between uses; no probe): a loss-driven
    controller trains like engine=torch and resumes exactly (gradient controllers: the "3p" runs)."""
    root, data = runs["root"], runs["data"]
    mixture = {"name": "test_loss_softmax", "tau": 0.5}
    engine = {"name": "deepspeed", "deepspeed": {"zero_stage": 3}}
    for name, eng in (("loss_torch", {}), ("loss_zero3", engine)):
        proc = _launch(_values(data, root / name, eng, mixture), root / f"{name}.json")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ZeRO-3 with partitioned parameters" in proc.stdout
    ref, got = losses_by_step(root / "loss_torch"), losses_by_step(root / "loss_zero3")
    for step, rec in ref.items():
        for key, v in rec.items():
            if key.startswith(("train/loss", "eval/")):
                assert _close(got[step][key], v, abs(v)), (step, key)
    assert _ranks(root / "loss_zero3")[0]["history"] == _ranks(root / "loss_zero3")[1]["history"]
    runs_local = {**runs, "loss_zero3": root / "loss_zero3"}
    _crash_and_resume(runs_local, "loss_zero3", engine, mixture)


def test_partitioned_nvme_offload_refuses_gradient_signals():
    """Partitioned ZeRO-3 parameters offloaded to nvme are not supported by the probe (untested):
    refused with the knobs to turn (the check alone: no DeepSpeed engine or nvme needed)."""
    from types import SimpleNamespace

    from trainer.engines.deepspeed_engine import DeepSpeedEngine

    cfg = EngineConfig(
        name="deepspeed", deepspeed=DeepSpeedConfig(zero_stage=3, offload_param="nvme", offload_nvme_path="/nvme")
    )
    with pytest.raises(
        ConfigError, match=r"engine\.deepspeed\.offload_param=nvme.*engine\.deepspeed\.zero3_whole_params=true"
    ):
        DeepSpeedEngine._check_probe(SimpleNamespace(_partitioned=True, engine_cfg=cfg), object())
    for offload in ("none", "cpu"):  # partitioned (also CPU-offloaded) parameters: the probe works
        DeepSpeedEngine._check_probe(
            SimpleNamespace(
                _partitioned=True,
                engine_cfg=EngineConfig(
                    name="deepspeed", deepspeed=DeepSpeedConfig(zero_stage=3, offload_param=offload)
                ),
            ),
            object(),
        )


def test_engine_contract_matches_torch_engine(tmp_path):
    """One process, ZeRO 0-3 against the torch engine: loss weights != 1, 2 micro-batches, clipping
    active, the probe, on_losses; weights loaded with load_state_dict stick; partitioned ZeRO-3
    (also with parameters offloaded to CPU) gives the same probe statistics and evaluates."""
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [sys.executable, str(STEP_SCRIPT), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ref = report["torch"]
    assert min(ref["norm"]) > 0.05  # TrainConfig.grad_clip=0.05 clipped every step
    for stage in (0, 1, 2, 3, "3p", "3p_offload"):
        got = report[f"zero{stage}"]
        for key in ("sums", "norm", "norms"):
            a, b = np.asarray(ref[key]), np.asarray(got[key])
            assert np.allclose(b, a, rtol=REL, atol=0), (stage, key, a, b)
        a, b = np.asarray(ref["align"]), np.asarray(got["align"])
        assert np.abs(a - b).max() <= REL * np.abs(a).max(), (stage, a, b)
        for name, values in ref["params"].items():
            assert np.allclose(got["params"][name], values, rtol=0, atol=1e-6), (stage, name)
        assert got["hook_rows"] == ref["hook_rows"] == 3 * 8
        assert got["loaded_deviation"] < 1e-6, stage
    assert report["partitioned_eval"] == [3, True]  # one finite loss sum per sequence


def test_checkpoint_layout_and_offline_read(runs):
    """DeepSpeed's files inside mixtrain's checkpoint directory; meta.json records the engine format;
    engines.read_checkpoint (no process group: a reference model, scores) merges the fp32 weights."""
    for stage in (0, 2, 3):
        ckpt = checkpoint.latest(runs[f"zero{stage}"] / "checkpoints")
        assert ckpt.name == "step_00000020" and not (ckpt / "state.pt").exists()
        assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
        meta = checkpoint.load_meta(ckpt)
        assert meta["engine"] == {"name": "deepspeed", "zero_stage": stage, "precision": "fp32"}
        state, _, rng = engines.read_checkpoint(ckpt, rank=1)
        assert rng is not None and state["loop"]["step"] == 20 and "controller" in state
        h = hashlib.sha256()
        for name, p in sorted(state["engine"]["model"].items()):
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
        assert h.hexdigest() == _ranks(runs[f"zero{stage}"])[0]["params_sha256"]
    torch_ckpt = checkpoint.latest(runs["torch"] / "checkpoints")
    assert (torch_ckpt / "state.pt").is_file() and "engine" not in checkpoint.load_meta(torch_ckpt)  # layout unchanged


def test_interrupted_deepspeed_save_never_becomes_latest(runs, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(runs["zero2"] / "checkpoints", root)
    latest = checkpoint.latest(root)
    partial = root / "step_00000030.tmp"  # killed while DeepSpeed wrote its partitions
    shutil.copytree(latest / "deepspeed", partial / "deepspeed")
    no_meta = root / "step_00000040"  # renamed but meta.json missing (cannot happen, still refused)
    shutil.copytree(latest / "deepspeed", no_meta / "deepspeed")
    assert checkpoint.latest(root) == latest


def test_resume_refuses_another_engine_layout(runs, tmp_path):
    """A DeepSpeed checkpoint is not resumed by engine=torch or another ZeRO stage, and vice versa;
    refused before anything is built or written."""
    from trainer.loop import Loop

    cases = [
        ("zero2", {}, "engine.name"),
        ("zero2", {"name": "deepspeed", "deepspeed": {"zero_stage": 1}}, "engine.deepspeed.zero_stage"),
        ("torch", {"name": "deepspeed"}, "engine.name"),
    ]
    for i, (src, engine, knob) in enumerate(cases):
        run_dir = tmp_path / f"copy{i}"
        shutil.copytree(runs[src], run_dir)
        before = sorted(str(p) for p in run_dir.rglob("*"))
        with pytest.raises(checkpoint.CheckpointMismatch, match=knob):
            Loop(load_config(_values(runs["data"], run_dir, engine)))
        assert sorted(str(p) for p in run_dir.rglob("*")) == before


def test_ds_config_from_knobs():
    train = TrainConfig(micro_batch=4, grad_accum=3, grad_clip=0.5)
    cfg = build_ds_config(
        EngineConfig(
            name="deepspeed",
            precision="bf16",
            deepspeed=DeepSpeedConfig(
                zero_stage=2,
                offload_optimizer="cpu",
                ds_config={"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True},
            ),
        ),
        train,
        world_size=2,
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True}
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg and "optimizer" not in cfg and "scheduler" not in cfg
    assert cfg["wall_clock_breakdown"] is True  # engine.deepspeed.ds_config merged last
    z3 = build_ds_config(
        EngineConfig(
            name="deepspeed",
            deepspeed=DeepSpeedConfig(
                zero_stage=3, zero3_whole_params=True, offload_param="nvme", offload_nvme_path="/nvme"
            ),
        ),
        train,
        1,
    )["zero_optimization"]
    assert (
        z3["offload_param"] == {"device": "nvme", "nvme_path": "/nvme"}
        and z3["stage3_param_persistence_threshold"] >= 2**60
    )
    assert (
        "stage3_param_persistence_threshold"
        not in build_ds_config(EngineConfig(name="deepspeed", deepspeed=DeepSpeedConfig(zero_stage=3)), train, 1)[
            "zero_optimization"
        ]
    )


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"zero_stage": 4}, "engine.deepspeed.zero_stage=4; allowed: 0, 1, 2, 3"),
        (
            {"offload_optimizer": "gpu", "zero_stage": 2},
            "engine.deepspeed.offload_optimizer='gpu'; allowed: none, cpu, nvme",
        ),
        ({"offload_optimizer": "cpu"}, "needs engine.deepspeed.zero_stage 1, 2 or 3"),
        (
            {"offload_param": "cpu", "zero_stage": 2},
            "engine.deepspeed.offload_param=cpu needs engine.deepspeed.zero_stage=3",
        ),
        ({"offload_param": "nvme", "zero_stage": 3}, "engine.deepspeed.offload_nvme_path"),
        (
            {"zero3_whole_params": True, "zero_stage": 2},
            "engine.deepspeed.zero3_whole_params=true needs engine.deepspeed.zero_stage=3",
        ),
        (
            {"ds_config": {"gradient_accumulation_steps": 4}},
            "engine.deepspeed.ds_config.gradient_accumulation_steps is set from train.grad_accum",
        ),
        (
            {"ds_config": {"bf16": {"enabled": True}}},
            "engine.deepspeed.ds_config.bf16 is set from engine.precision",
        ),
        (
            {"ds_config": {"zero_optimization": {"stage": 3}}},
            "engine.deepspeed.ds_config.zero_optimization.stage is set from engine.deepspeed.zero_stage",
        ),
        (
            {
                "ds_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
                "zero_stage": 3,
                "zero3_whole_params": True,
            },
            "conflicts with engine.deepspeed.zero3_whole_params=true",
        ),
        ({"ds_config": [1]}, "engine.deepspeed.ds_config must be a mapping"),
    ],
)
def test_knob_validation_names_the_knob(knobs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        EngineConfig(name="deepspeed", deepspeed=DeepSpeedConfig(**knobs)).validate()


def test_deepspeed_knobs_refused_with_torch_engine():
    with pytest.raises(ConfigError, match=r"engine\.deepspeed\.zero_stage applies to engine\.name=deepspeed only"):
        EngineConfig(name="torch", deepspeed=DeepSpeedConfig(zero_stage=2)).validate()
    EngineConfig(
        name="deepspeed",
        deepspeed=DeepSpeedConfig(
            zero_stage=3, ds_config={"zero_optimization": {"stage3_param_persistence_threshold": 0}}
        ),
    ).validate()


def test_hydra_group_composes():
    from hydra import compose, initialize_config_dir

    from trainer import schema

    schema.register()  # config.yaml starts from the structured schema

    with initialize_config_dir(version_base=None, config_dir=str(REPO / "trainer" / "conf")):
        cfg = compose(
            config_name="config",
            overrides=[
                "engine=deepspeed",
                "engine.deepspeed.zero_stage=2",
                "+engine.deepspeed.ds_config.zero_optimization.overlap_comm=true",
            ],
        )
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    engine = load_config(values).engine
    assert engine.name == "deepspeed" and engine.deepspeed.zero_stage == 2 and engine.precision == "fp32"
    assert engine.deepspeed.ds_config == {"zero_optimization": {"overlap_comm": True}}
