"""Process-group set-up and the few collectives the loop needs, usable with or without a group."""

from __future__ import annotations

import datetime
import os
import pickle

import torch
import torch.distributed as dist

from .config import ConfigError


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process when unset)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init(backend: str = "auto") -> tuple[int, int, int]:
    """Join the process group torchrun describes; a no-op for one process or when already joined."""
    rank, world, local = env_world()
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return rank, world, local


def data_parallel(rank: int, world: int, tensor_parallel: int = 1) -> tuple[int, int]:
    """(data-parallel rank, size) with ``tensor_parallel`` ranks per model replica, TP-fastest as
    megatron orders them: ranks dp*TP .. dp*TP + TP - 1 form one replica and see the same data."""
    if world % tensor_parallel:
        raise ConfigError(
            f"engine.megatron.tensor_parallel={tensor_parallel} does not divide the {world} ranks; allowed: "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    return rank // tensor_parallel, world // tensor_parallel


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if active():
        dist.broadcast(t, src=src)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank (pickled through a byte tensor; gloo and nccl alike)."""
    if not active():
        return obj
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if dist.get_rank() == src:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    if dist.get_rank() != src:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src)
    return pickle.loads(payload.cpu().numpy().tobytes())


def all_gather_object(obj) -> list:
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
