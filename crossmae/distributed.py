"""Tiny typed helpers around torch.distributed. Processes are started by torchrun (or by the
submitit launcher, which exports the same variables); NCCL on GPU, gloo on CPU."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group described by torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) if they are set, and return this process's device.

    ``device``: ``"auto"`` (this process's GPU if CUDA is available, else CPU), ``"cpu"`` or
    ``"cuda"``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device=cuda: this machine has no CUDA device (train.device=cpu "
                         "or auto runs on the CPU)")  # fmt: skip
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=30),
            device_id=dev if use_cuda else None,
        )
    return dev


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a new tensor; the identity for a single process)."""
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max over processes (a new tensor)."""
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_objects(obj: object) -> list:
    """Every process's ``obj`` (picklable), in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, rank: int, world: int) -> list[int]:
    """Indices ``rank, rank + world, ...``: every one of ``n`` items on exactly one process (no
    padding, unlike DistributedSampler, so evaluation counts each item once)."""
    return list(range(rank, n, world))


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
