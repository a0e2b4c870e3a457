"""``mixtrain export-model``: checkpoints of every engine as Hugging Face ``transformers`` folders.

- torch-engine checkpoints of both families, tied and untied (a GPT without biases too): the
  folder loads with ``AutoModelForCausalLM`` with no missing or unexpected keys, keeps the padded
  vocabulary (320 rows for the 257 ids of the bytes tokenizer), and its fp32 logits equal
  mixtrain's within 2e-5 (measured <= 2.4e-6, logits up to 7);
- merged checkpoints against the live model's logits (tests/scripts/run_config.py): DeepSpeed
  ZeRO-3 with partitioned parameters on 2 ranks, and megatron TP=2 for the GPT (fused qkv,
  biases, learned positions, tied, the exact GELU) and Llama (query groups, SwiGLU [gate; up]
  split with stride 2, untied) families (slow: torchrun; measured 7.2e-7, 1.9e-6 and 2.9e-6);
- megatron's tensor-parallel shards merge back into the tensors megatron split them from (its own
  ``_initialize_affine_weight_cpu``);
- tokenizers: the bytes, gpt2 and tokenizers-JSON tokenizers give mixtrain's ids; one whose file
  cannot be found is a note, and the model is written all the same;
- refusals: one line that names the argument.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import FAR_TRAINED, TINY_LLAMA, cli_status, make_shardset, run_torchrun, tiny_config, tiny_values

from trainer import checkpoint, engines
from trainer.config import ConfigError, ModelConfig
from trainer.loop import Loop

pytest.importorskip("transformers")

SCRIPT = "tests/scripts/run_config.py"
TOL = 2e-5
"""Max |logit difference| in fp32: the issue asks 1e-4; measured <= 2.9e-6 (logits up to ~7), and a
tanh GELU in place of megatron's exact one moves megatron's GPT by 8.4e-5, which this still catches."""
TRAIN = FAR_TRAINED
"""Large steps, so that the model is far from linear (after 4 steps at lr 3e-3 the wrong GELU moved
the logits by 2e-6 only)."""
CASES = {
    "gpt-tied": {},
    "gpt-untied-nobias": {"tie_embeddings": False, "bias": False},
    "llama-untied": {**TINY_LLAMA, "tie_embeddings": False},
    "llama-tied": TINY_LLAMA,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shardset(tmp_path_factory.mktemp("export-data"))


def _train(data, run_dir, model: dict):
    """A tiny model (bytes tokenizer) trained by ``TRAIN`` on the torch engine; its last checkpoint."""
    cfg = tiny_config(data, run_dir, **{f"model.{k}": v for k, v in model.items()}, **TRAIN)
    Loop(cfg).train()
    return checkpoint.latest(run_dir / "checkpoints")


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _hf(folder):
    """The exported model, asserting it loaded every weight it has and nothing else."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _max_diff(folder, ids, reference: torch.Tensor) -> float:
    with torch.no_grad():
        logits = _hf(folder)(ids).logits
    assert logits.shape == reference.shape
    return float((logits - reference).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_torch_checkpoint_logits_match(data, tmp_path, case):
    ckpt = _train(data, tmp_path / "run", CASES[case])
    out = tmp_path / "hf"
    assert cli_status(["export-model", str(tmp_path / "run"), "--out", str(out)]) == 0
    cfg = ModelConfig(**checkpoint.load_meta(ckpt)["fingerprint"]["model"])
    ours = engines.load_frozen(cfg, ckpt, "cpu")
    ids = _ids()
    with torch.no_grad():
        reference = ours(ids)
    diff = _max_diff(out, ids, reference)
    print(f"{case}: max |logit difference| {diff:.1e} (logits up to {float(reference.abs().max()):.1f})")
    assert diff <= TOL

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[cfg.name]]
    assert config["vocab_size"] == 320 and config["tie_word_embeddings"] == cfg.tie_embeddings
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256
    assert json.loads((out / "mixtrain.json").read_text())["step"] == 30
    from transformers import AutoTokenizer

    text = "naïve café, 12 + 30 = 42\n"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == list(text.encode())


def test_refusals_name_the_argument(data, tmp_path, capsys):
    _train(data, tmp_path / "run", {})
    cases = [
        (["export-model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")], "RUN="),
        (["export-model", str(tmp_path / "run"), "--step", "2", "--out", str(tmp_path / "a")], r"--step 2: .*\[30\]"),
        (["export-model", str(tmp_path / "run"), "--out", str(tmp_path / "run")], "--out"),
    ]
    for argv, message in cases:
        assert cli_status(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mixtrain: error: "), err
        assert re.search(message, err[0]), err
    assert not (tmp_path / "a").exists()


def test_tokenizers_give_mixtrains_ids(tmp_path):
    from transformers import AutoTokenizer

    from trainer.commands.planted import train_bpe
    from trainer.data import tokenizer_export
    from trainer.data.tokenizer import get_tokenizer
    from trainer.data.tokenizer_options import load_tokenizer

    text = "Hello world! It's 2024 — naïve café,   spaces\n\nnew  lines 12345 end\t 😀 'll"
    bpe_file = tmp_path / "bpe" / "tokenizer.json"
    bpe_file.parent.mkdir()
    train_bpe([text * 3, "the cat sat on the mat " * 20], 300).save(str(bpe_file))
    for tok, search in (
        (get_tokenizer("gpt2"), []),
        (get_tokenizer("bytes"), []),
        (load_tokenizer(str(bpe_file)), [tmp_path / "elsewhere", bpe_file.parent]),
    ):
        out = tmp_path / tok.name
        tokenizer_export.write(tok.identity(), out, 64, search)
        hf = AutoTokenizer.from_pretrained(out)
        assert hf(text)["input_ids"] == tok.encode(text), tok.name
        assert hf.eos_token_id == tok.eod and hf.decode(tok.encode(text)) == text
    identity = load_tokenizer(str(bpe_file)).identity()
    with pytest.raises(tokenizer_export.NoHFTokenizer, match="tokenizer.json"):
        tokenizer_export.build(identity, [tmp_path])  # not there
    with pytest.raises(tokenizer_export.NoHFTokenizer, match="tokenizer.json"):
        tokenizer_export.build({**identity, "files": {"tokenizer.json": "0" * 64}}, [bpe_file.parent])  # another file


def test_tensor_parallel_shards_merge_as_megatron_splits_them():
    """TP=2 shards cut by megatron-core's own CPU initialisation (rank r takes chunks r, r + TP, ...
    of the master weight, in chunks of size/stride) merge back into the master tensors."""
    pytest.importorskip("megatron.core")
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    from trainer.models.megatron_gpt import merge_tensor_parallel

    d, ffn, tp = 8, 12, 2
    g = torch.Generator().manual_seed(0)
    full = {  # key -> (master, partition dim or None = replicated, stride)
        "embedding.word_embeddings.weight": (torch.randn(16, d, generator=g), 0, 1),
        "decoder.layers.0.input_layernorm.weight": (torch.randn(d, generator=g), None, 1),
        "decoder.layers.0.self_attention.linear_qkv.weight": (torch.randn(3 * d, d, generator=g), 0, 1),
        "decoder.layers.0.self_attention.linear_proj.weight": (torch.randn(d, d, generator=g), 1, 1),
        "decoder.layers.0.self_attention.linear_proj.bias": (torch.randn(d, generator=g), None, 1),
        "decoder.layers.0.mlp.linear_fc1.weight": (torch.randn(2 * ffn, d, generator=g), 0, 2),  # [gate; up]
        "decoder.layers.0.mlp.linear_fc2.weight": (torch.randn(d, ffn, generator=g), 1, 1),
        "output_layer.weight": (torch.randn(16, d, generator=g), 0, 1),
    }
    shards = [{} for _ in range(tp)]
    for key, (master, dim, stride) in full.items():
        for r in range(tp):
            if dim is None:
                shards[r][key] = master.clone()
                continue
            shape = list(master.shape)
            shape[dim] //= tp
            part = torch.empty(shape)
            _initialize_affine_weight_cpu(
                part,
                master.shape[0],
                master.shape[1],
                shape[dim],
                dim,
                lambda w, m=master: w.copy_(m),
                stride=stride,
                rank=r,
                world_size=tp,
                skip_set_tensor_parallel_attributes=True,
            )
            shards[r][key] = part
    merged = merge_tensor_parallel(shards)
    assert merged.keys() == full.keys()
    for key, (master, _, _) in full.items():
        assert torch.equal(merged[key], master), key


# ---- merged checkpoints (torchrun) -----------------------------------------------------------


def _launch(values: dict, root, name: str):
    """Train on 2 ranks; the run directory and the live model's logits on run_config.py's batch."""
    from helpers import REPO

    cfg_path, logits = root / f"{name}.json", root / f"{name}.logits.pt"
    cfg_path.write_text(json.dumps(values))
    proc = run_torchrun(2, REPO / SCRIPT, str(cfg_path), str(logits))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / name, torch.load(logits)


def _merged_case(data, tmp_path, name: str, engine: dict, model: dict) -> float:
    knobs = {"engine": {"threads": 1, **engine}, "train.micro_batch": 2, **TRAIN}
    values = tiny_values(data, tmp_path / name, **knobs, **{f"model.{k}": v for k, v in model.items()})
    run_dir, live = _launch(values, tmp_path, name)
    out = tmp_path / f"{name}-hf"
    assert cli_status(["export-model", str(run_dir), "--out", str(out)]) == 0
    diff = _max_diff(out, live["ids"], live["logits"])
    print(f"{name}: max |logit difference| {diff:.1e} (logits up to {float(live['logits'].abs().max()):.1f})")
    assert math.isfinite(diff) and diff <= TOL
    return out


@pytest.mark.slow
def test_deepspeed_zero3_checkpoint_logits_match(data, tmp_path):
    pytest.importorskip("deepspeed")
    _merged_case(data, tmp_path, "zero3", {"name": "deepspeed", "deepspeed": {"zero_stage": 3}}, {})


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, model",
    [("gpt", {}), ("llama", {**TINY_LLAMA, "tie_embeddings": False})],
)
def test_megatron_tp2_checkpoint_logits_match(data, tmp_path, family, model):
    pytest.importorskip("megatron.core")
    engine = {"name": "megatron", "megatron": {"tensor_parallel": 2}}
    out = _merged_case(data, tmp_path, f"megatron-{family}", engine, model)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 384  # engine.megatron.vocab_multiple=128
    ckpt = checkpoint.latest(tmp_path / f"megatron-{family}" / "checkpoints")
    state = engines.read_checkpoint(ckpt)[0]["engine"]["model"]
    assert state["embedding.word_embeddings.weight"].shape == (384, 32)  # both TP ranks' rows
    with pytest.raises(ConfigError, match="megatron's model"):
        engines.load_frozen(ModelConfig(**checkpoint.load_meta(ckpt)["fingerprint"]["model"]), ckpt, "cpu")
