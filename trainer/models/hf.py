"""mixtrain's and megatron-core's decoders in Hugging Face ``transformers`` terms: the keyword
arguments of the config class and the weights under its names. Names and tensors only (torch, no
transformers): ``trainer.commands.export_model`` writes the folder.

- ``gpt`` -> ``GPT2LMHeadModel``. GPT-2's ``Conv1D`` layers store [in, out], the transpose of our
  Linear weights; ``c_attn`` is our fused ``attn.qkv`` ([q; k; v] rows). GPT-2 always has biases
  and LayerNorm biases: a ``model.bias=false`` model gets zeros there, which computes the same.
  Activation ``gelu_new`` (tanh), as ``trainer.models.gpt`` uses; megatron's GPT uses the exact
  erf GELU, so its export says ``gelu``.
- ``llama`` -> ``LlamaForCausalLM``: one to one (rotary is the rotate-half layout in all three, so
  the q/k rows need no permutation); no biases.
- megatron's names are first mapped to ours (:func:`megatron_to_mixtrain`): the fused
  ``linear_qkv`` holds, per query group, that group's query heads, then its key head, then its value
  head; the SwiGLU ``linear_fc1`` holds [gate; up].

The vocabulary keeps every row of the embedding (padded past the tokenizer's size: to a multiple of
64, or of engine.megatron.vocab_multiple); Hugging Face allows a config vocabulary larger than the
tokenizer's, and the padded ids are never produced.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig

ARCHITECTURES = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
NAMES = ("mixtrain", "megatron")
"""Whose parameter names a checkpoint's full weights carry (``Engine.weight_names``)."""


class UnmappedWeights(ValueError):
    """A state dict with keys the export does not know (another layout, another family)."""


class _Taken:
    """A state dict read key by key; :meth:`done` refuses keys nobody read, so no weight is dropped silently."""

    def __init__(self, state: dict[str, torch.Tensor], where: str):
        self.state, self.where, self.read = state, where, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise UnmappedWeights(f"{self.where} has no {key!r}")
        self.read.add(key)
        return self.state[key]

    def get(self, key: str) -> torch.Tensor | None:
        return self(key) if key in self.state else None

    def done(self) -> None:
        left = sorted(set(self.state) - self.read)
        if left:
            raise UnmappedWeights(f"{self.where} holds weights the export does not map: {left[:6]}")


def hf_config(cfg: ModelConfig, vocab_rows: int, eod: int | None, *, names: str = "mixtrain") -> dict:
    """Keyword arguments of the ``transformers`` config (``model_type`` first, for ``AutoConfig.for_model``)."""
    common = {"vocab_size": int(vocab_rows), "tie_word_embeddings": bool(cfg.tie_embeddings), "dtype": "float32"}
    if eod is not None:
        common.update(bos_token_id=int(eod), eos_token_id=int(eod))
    if cfg.name == "gpt":
        return {
            "model_type": "gpt2",
            "architectures": [ARCHITECTURES["gpt"]],
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.hidden,
            "activation_function": "gelu" if names == "megatron" else "gelu_new",
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": cfg.norm_eps,
            **common,
        }
    if cfg.name == "llama":
        return {
            "model_type": "llama",
            "architectures": [ARCHITECTURES["llama"]],
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.d_model // cfg.n_head,
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": cfg.dropout,
            "mlp_bias": False,
            **common,
        }
    raise UnmappedWeights(f"model.name={cfg.name!r} has no Hugging Face export; allowed: {', '.join(ARCHITECTURES)}")


def to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], names: str = "mixtrain") -> dict[str, torch.Tensor]:
    """The weights of ``hf_config``'s model, contiguous (safetensors stores nothing else), from full
    weights under ``names``' parameter names. A tied head is left out: transformers ties it on load."""
    if names not in NAMES:
        raise ValueError(f"weights named {names!r}; known: {', '.join(NAMES)}")
    if names == "megatron":
        state = megatron_to_mixtrain(cfg, state)
    take = _Taken(state, "the checkpoint's model")
    out = _gpt2(cfg, take) if cfg.name == "gpt" else _llama(cfg, take)
    if cfg.tie_embeddings:
        take.get("lm_head.weight")  # the embedding itself
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    take.done()
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _gpt2(cfg: ModelConfig, take: _Taken) -> dict[str, torch.Tensor]:
    def bias(key: str, n: int) -> torch.Tensor:
        b = take.get(key)
        return torch.zeros(n) if b is None else b

    d = cfg.d_model
    out = {"transformer.wte.weight": take("wte.weight"), "transformer.wpe.weight": take("wpe.weight")}
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"{hf}{b}.weight"] = take(f"{ours}{a}.weight")
            out[f"{hf}{b}.bias"] = bias(f"{ours}{a}.bias", d)
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc")):
            w = take(f"{ours}{a}.weight")
            out[f"{hf}{b}.weight"] = w.T  # Conv1D: [in, out]
            out[f"{hf}{b}.bias"] = bias(f"{ours}{a}.bias", w.shape[0])
        out[f"{hf}mlp.c_proj.weight"] = take(f"{ours}mlp.proj.weight").T
        out[f"{hf}mlp.c_proj.bias"] = bias(f"{ours}mlp.proj.bias", d)
    out["transformer.ln_f.weight"] = take("ln_f.weight")
    out["transformer.ln_f.bias"] = bias("ln_f.bias", d)
    return out


_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}


def _llama(cfg: ModelConfig, take: _Taken) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": take("tok.weight"), "model.norm.weight": take("ln_f.weight")}
    for i in range(cfg.n_layer):
        for ours, hf in _LLAMA_LAYER.items():
            out[f"model.layers.{i}.{hf}"] = take(f"blocks.{i}.{ours}")
    return out


_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
"""Transformer Engine's layer spec fuses each pre-norm into the linear after it; these are the local
spec's names for the same vectors."""


def megatron_to_mixtrain(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron-core GPTModel's full weights (``trainer.models.megatron_gpt``: local or Transformer
    Engine spec, TP shards merged) under our model's names."""
    renamed = {}
    for k, v in state.items():
        if k.endswith("_extra_state"):
            continue
        prefix, _, leaf = k.partition(".layers.")
        layer, _, rest = leaf.partition(".")
        renamed[f"{prefix}.layers.{layer}.{_TE_NORMS[rest]}" if rest in _TE_NORMS else k] = v
    take = _Taken(renamed, "the megatron checkpoint")
    gpt = cfg.name == "gpt"
    nh, ng, hd = cfg.n_head, cfg.kv_heads, cfg.d_model // cfg.n_head
    out = {("wte.weight" if gpt else "tok.weight"): take("embedding.word_embeddings.weight")}
    if gpt:
        out["wpe.weight"] = take("embedding.position_embeddings.weight")
    out_layer = take.get("output_layer.weight")
    if out_layer is not None:
        out["lm_head.weight"] = out_layer

    def copy(src: str, dst: str) -> None:
        for kind in ("weight", "bias"):
            t = take.get(f"{src}.{kind}")
            if t is not None:
                out[f"{dst}.{kind}"] = t

    copy("decoder.final_layernorm", "ln_f")
    for i in range(cfg.n_layer):
        m, o = f"decoder.layers.{i}.", f"blocks.{i}."
        copy(f"{m}input_layernorm", f"{o}{'ln1' if gpt else 'attn_norm'}")
        copy(f"{m}pre_mlp_layernorm", f"{o}{'ln2' if gpt else 'mlp_norm'}")
        copy(f"{m}self_attention.linear_proj", f"{o}attn.{'proj' if gpt else 'o'}")
        for kind in ("weight", "bias"):
            fused = take.get(f"{m}self_attention.linear_qkv.{kind}")
            if fused is None:
                continue
            # rows per query group g: its nh/ng query heads, then key head g, then value head g
            grouped = fused.reshape(ng, nh // ng + 2, hd, *fused.shape[1:])
            q = grouped[:, :-2].reshape(nh * hd, *fused.shape[1:])
            k, v = (grouped[:, j].reshape(ng * hd, *fused.shape[1:]) for j in (-2, -1))
            if gpt:
                out[f"{o}attn.qkv.{kind}"] = torch.cat([q, k, v])
            else:
                out.update({f"{o}attn.q.{kind}": q, f"{o}attn.k.{kind}": k, f"{o}attn.v.{kind}": v})
        if gpt:
            copy(f"{m}mlp.linear_fc1", f"{o}mlp.fc")
            copy(f"{m}mlp.linear_fc2", f"{o}mlp.proj")
        else:
            out[f"{o}mlp.gate.weight"], out[f"{o}mlp.up.weight"] = take(f"{m}mlp.linear_fc1.weight").chunk(2)
            out[f"{o}mlp.down.weight"] = take(f"{m}mlp.linear_fc2.weight")
    take.done()
    return out
