"""What a lab expects of the engines beyond fp32 DDP: the FLOP count behind MFU, the throughput
keys every step logs, bf16 on the torch engine tracking fp32, compiled blocks with the probe at the
loop level, and the new knobs' refusals."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_LLAMA, losses_by_step, make_shardset, tiny_config, tiny_values

from trainer import schema, throughput
from trainer.config import ConfigError, EngineConfig, ModelConfig, load_config
from trainer.loop import Loop
from trainer.models import build_model
from trainer.models.layers import Linear


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("lab") / "data")


def test_flops_per_token_gpt2_small_by_hand():
    """GPT-2 124M, T = 1024: matmul weights 12 (4·768² + 2·768·3072) + 768·50304 = 123,568,128;
    6 x that + 12 · 12 · 1024 · 768 = 854,654,976 FLOPs per token."""
    cfg = ModelConfig(n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50304)
    assert throughput.matmul_params(cfg) == 123_568_128
    assert throughput.flops_per_token(cfg, 1024) == 6 * 123_568_128 + 12 * 12 * 1024 * 768 == 854_654_976


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_matmul_weights_are_every_linear_layer(family, tied):
    """The formula's weights are exactly the model's linear layers (grouped-query k/v, SwiGLU's gate
    and the head included), so MFU counts what the model multiplies."""
    extra = {"name": "llama", "n_kv_head": 2, "bias": False} if family == "llama" else {}
    cfg = ModelConfig(n_layer=3, n_head=4, d_model=64, vocab_size=101, tie_embeddings=tied, **extra)
    model = build_model(cfg)
    assert throughput.matmul_params(cfg) == sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear))


def test_every_step_logs_throughput(data, tmp_path):
    loop = Loop(tiny_config(data, tmp_path / "run", **{"model": TINY_LLAMA, "train.steps": 3}))
    loop.train()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train/loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert r[throughput.TOKENS_PER_SEC_PER_DEVICE] == r["perf/tokens_per_sec"]  # one rank
        assert 0 < r[throughput.MFU] < 1 and math.isfinite(r[throughput.MFU])
        assert r[throughput.PEAK_MEMORY] > 0


def test_bf16_autocast_tracks_fp32_over_50_steps(data, tmp_path):
    """engine.precision=bf16 on the torch engine (fp32 master weights and AdamW state, bf16 autocast
    compute): every one of 50 training losses within 0.05 nats of the fp32 run, the final
    evaluation within 0.02; the checkpointed weights stay fp32."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(
            data,
            tmp_path / precision,
            **{"model": TINY_LLAMA, "train.steps": 50, "train.eval_every": 25, "engine.precision": precision},
        )
        loop = Loop(cfg)
        loop.train()
        assert all(p.dtype == torch.float32 for p in loop.engine.model.parameters())
        runs[precision] = losses_by_step(tmp_path / precision)
    ref, got = runs["fp32"], runs["bf16"]
    gap = np.array([abs(got[s]["train/loss"] - ref[s]["train/loss"]) for s in ref if "train/loss" in ref[s]])
    assert len(gap) == 50 and gap.max() <= 0.05, gap.max()
    assert abs(got[50]["eval/loss"] - ref[50]["eval/loss"]) <= 0.02
    assert ref[49]["train/loss"] < ref[0]["train/loss"] - 0.5  # it learned: the comparison is not of noise


@pytest.mark.slow  # inductor compiles each block once (~30 s on 2 cores)
def test_compiled_blocks_with_a_probing_controller_match_eager(data, tmp_path):
    """engine.compile=true with DoGE (alignments + Gram from the probe in every backward) and
    activation checkpointing: the same losses, alignments and weights as eager within 1e-4."""
    runs = {}
    for name, knobs in (("eager", {}), ("compiled", {"engine.compile": True, "engine.activation_checkpointing": True})):
        cfg = tiny_config(
            data, tmp_path / name, **{"model": TINY_LLAMA, "train.steps": 6, "mixture": {"name": "doge"}, **knobs}
        )
        Loop(cfg).train()
        runs[name] = losses_by_step(tmp_path / name)
    for step, rec in runs["eager"].items():
        for key, v in rec.items():
            if isinstance(v, float):
                assert abs(runs["compiled"][step][key] - v) <= 1e-4 * max(1.0, abs(v)), (step, key)
    assert any(k.startswith("probe/align/") for rec in runs["eager"].values() for k in rec)


@pytest.mark.parametrize(
    "engine,message",
    [
        ({"name": "deepspeed", "compile": True}, "engine.compile=true applies to engine.name torch"),
        (
            {"name": "megatron", "activation_checkpointing": True},
            "engine.activation_checkpointing=true applies to engine.name torch or fsdp",
        ),
        ({"precision": "fp16"}, "engine.precision='fp16' on engine.name=torch; allowed: fp32, bf16"),
        ({"name": "fsdp", "precision": "fp8"}, "allowed: fp32, bf16"),
        ({"compile": "yes"}, "engine.compile='yes'; allowed: true, false"),
        ({"name": "torch", "fsdp": {"reshard_after_forward": False}}, "engine.fsdp.reshard_after_forward applies"),
        ({"peak_tflops": -1.0}, "engine.peak_tflops=-1.0 must be >= 0"),
    ],
)
def test_engine_knobs_are_refused_naming_the_knob(engine, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(**{k: v for k, v in engine.items() if k != "fsdp"}, **_fsdp(engine)).validate()


def _fsdp(engine: dict) -> dict:
    from trainer.config import FSDPConfig

    return {"fsdp": FSDPConfig(**engine["fsdp"])} if "fsdp" in engine else {}


@pytest.mark.parametrize(
    "model,message",
    [
        ({**TINY_LLAMA, "n_kv_head": 3}, r"model.n_kv_head=3 must divide model.n_head=4; allowed: \[1, 2, 4\]"),
        ({"n_kv_head": 1}, "model.n_kv_head applies to model.name=llama only"),
        ({**TINY_LLAMA, "bias": True}, "model.bias=true: model.name=llama has no biases"),
        ({**TINY_LLAMA, "n_head": 32, "d_model": 96, "n_kv_head": None}, "must be even for rotary embeddings"),
        ({"name": "mamba"}, "model.name='mamba'; allowed: gpt, llama"),
    ],
)
def test_model_knobs_are_refused_naming_the_knob(data, tmp_path, model, message):
    with pytest.raises(ConfigError, match=message):
        cfg = tiny_config(data, tmp_path, model=model)
        build_model(cfg.model)


def test_the_moved_precision_knob_names_its_new_place():
    with pytest.raises(ConfigError, match=r"engine.deepspeed.precision \(it is now engine.precision\)"):
        schema.normalise(["engine.deepspeed.precision=bf16"])


def test_megatron_tensor_parallel_must_divide_the_key_value_heads(data, tmp_path):
    values = tiny_values(
        data,
        tmp_path,
        model={**TINY_LLAMA, "n_kv_head": 1},
        engine={"name": "megatron", "megatron": {"tensor_parallel": 2}},
    )
    with pytest.raises(ConfigError, match="does not divide model.n_kv_head=1"):
        load_config(values)
