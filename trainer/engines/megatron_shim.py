"""The CUDA -> CPU shim megatron-core 0.16.1 needs on a machine without CUDA (engines.md §4.3).

megatron-core allocates some buffers on ``torch.cuda.current_device()`` (learned absolute positions
go through ``GlobalMemoryBuffer``) and keeps its dropout RNG in a CUDA RNG tracker. Without CUDA
those calls raise; redirecting them to the CPU device and the CPU generator is enough for GPTModel
(local layer spec) forward/backward at any TP. The patch replaces module attributes process-wide,
so it is applied only when CUDA is absent: on a GPU machine it is a no-op.
"""

from __future__ import annotations

import torch

_applied = False


def apply_cpu_shim() -> bool:
    """Patch torch.cuda's device/RNG entry points and megatron's RNG-state helpers to the CPU ones;
    returns whether the shim is active. Idempotent; never active when CUDA is available."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    import megatron.core.tensor_parallel.random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    _applied = True
    return True
