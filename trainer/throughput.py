"""Throughput you can see: model FLOPs per token, the device's peak, MFU, tokens/s per device and
peak memory, added to every step's record by a registered callback.

Model FLOPs (the PaLM paper's convention, appendix B, also Megatron-LM's and torchtitan's): a
training step costs 6 FLOPs per token per weight of every matrix multiply (2 forward, 4 backward),
the LM head included and the embedding lookup not, plus the attention scores and their weighted
sum, 2 · 2 · T · d per token and layer forward (QKᵀ and AV over a context of T, without halving
for the causal mask), times 3 for training: 12 · L · T · d. Norms, activations, the softmax and
the probe's extra work are not counted: MFU measures useful model arithmetic against the
hardware's peak, so recomputation (activation checkpointing) and the probe lower it.
"""

from __future__ import annotations

import functools
import resource
import sys
import time

import torch

from . import callbacks
from .config import ModelConfig

TOKENS_PER_SEC_PER_DEVICE = "perf/tokens_per_sec_per_device"
MFU = "perf/mfu"
PEAK_MEMORY = "perf/peak_memory_gib"

# Dense peak TFLOP/s by (device name fragment, precision): the datasheets' figures without sparsity;
# fp32 means TF32 tensor cores, which torch uses for fp32 matmuls when allowed (it is not by default,
# so fp32 MFU on these GPUs is against the TF32 peak and reads low unless TF32 is on).
GPU_PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0,
    ("H200", "fp32"): 494.0,
    ("H100", "bf16"): 989.0,
    ("H100", "fp32"): 494.0,
    ("A100", "bf16"): 312.0,
    ("A100", "fp32"): 156.0,
    ("L40S", "bf16"): 362.0,
    ("L40S", "fp32"): 183.0,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights of every matrix multiply per token: the blocks' projections and the LM head."""
    d, hd = cfg.d_model, cfg.d_model // cfg.n_head
    attn = 2 * d * cfg.n_head * hd + 2 * d * cfg.kv_heads * hd  # q, o; k, v (grouped-query: fewer heads)
    mlp = (3 if cfg.name == "llama" else 2) * d * cfg.hidden  # SwiGLU has a gate beside up/down
    return cfg.n_layer * (attn + mlp) + d * int(cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (module docstring): 6 · matmul weights + 12 · L · T · d."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * seq_len * cfg.d_model


@functools.cache
def measured_peak(device_type: str, dtype: torch.dtype, n: int = 1024) -> float:
    """FLOP/s of the best of three n x n GEMMs in ``dtype`` (the CPU has no datasheet peak here: MFU
    there is against what its BLAS reaches on a large square matmul). Taken through F.linear, the
    kernel a Linear layer's forward uses: on CPUs without bf16 units a bare bf16 ``a @ b`` runs a
    reference kernel ~20x slower than F.linear's oneDNN path."""
    a = torch.randn(n, n, dtype=dtype, device=device_type)
    b = torch.randn(n, n, dtype=dtype, device=device_type)
    torch.nn.functional.linear(a, b)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device at ``precision``, where the figure comes from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "engine.peak_tflops"
    compute = "bf16" if precision in ("bf16", "fp16") else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (fragment, prec), tflops in GPU_PEAK_TFLOPS.items():
            if fragment in name and prec == compute:
                return tflops * 1e12, f"{name} datasheet"
    dtype = torch.bfloat16 if compute == "bf16" else torch.float32
    return measured_peak(device.type, dtype), f"measured {compute} GEMM on {device.type}"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: the CUDA caching allocator's high-water mark, or on CPU the
    process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Throughput(callbacks.Callback):
    """Adds tokens/s per device, MFU and peak memory to each step's record (next to the loop's
    ``perf/tokens_per_sec``, the step's global tokens over its wall time)."""

    def __init__(self, model_cfg: ModelConfig, seq_len: int, world_size: int, device, engine_cfg):
        self.per_token = flops_per_token(model_cfg, seq_len)
        self.world_size, self.device = world_size, device
        self.peak, self.peak_source = peak_flops(device, engine_cfg.precision, engine_cfg.peak_tflops)

    def on_step(self, loop, record: dict, stats) -> None:
        from . import metrics

        per_device = record[metrics.TOKENS_PER_SEC] / self.world_size
        record[TOKENS_PER_SEC_PER_DEVICE] = per_device
        record[MFU] = per_device * self.per_token / self.peak
        record[PEAK_MEMORY] = peak_memory_gib(self.device)

    def describe(self) -> str:
        peak = f"{self.peak / 1e12:.1f} TFLOP/s" if self.peak >= 1e12 else f"{self.peak / 1e9:.1f} GFLOP/s"
        return f"{self.per_token / 1e6:.1f} MFLOP/token, peak {peak} ({self.peak_source})"


@callbacks.register
def _throughput(loop) -> Throughput:
    return Throughput(loop.cfg.model, loop.cfg.data.seq_len, loop.world, loop.engine.device, loop.cfg.engine)
