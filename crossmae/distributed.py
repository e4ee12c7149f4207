"""Tiny typed helpers around torch.distributed. Processes are started by torchrun (or by the
submitit launcher, which exports the same variables); NCCL on GPU, gloo on CPU."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


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
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=30),
            device_id=dev if use_cuda else None,
            **_joined(world, rank),
        )
    return dev


JOIN_TIMEOUT_S = 300.0  # how long the processes of a run wait for each other to start


def _joined(world: int, rank: int) -> dict:
    """The process group's store once all ``world`` processes have joined it, or an error
    naming who is missing after ``CROSSMAE_JOIN_TIMEOUT`` seconds (default 300): a process
    started with WORLD_SIZE > 1 and no peer would otherwise wait in silence. Under torchrun,
    whose agent gathers the processes itself, torch's own rendezvous."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return {}
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", 29500))
    wait = float(os.environ.get("CROSSMAE_JOIN_TIMEOUT", JOIN_TIMEOUT_S))
    try:
        store = dist.TCPStore(host, port, world, is_master=rank == 0,
                              timeout=timedelta(seconds=wait), wait_for_workers=True)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for the same problem
        who = (
            f"{world - 1} other process(es) (RANK 1..{world - 1}) did not join"
            if rank == 0
            else f"no main process (RANK 0) answered at {host}:{port}"
        )
        raise ConnectionError(
            f"WORLD_SIZE={world}, RANK={rank}: {who} within {wait:.0f} s ({type(e).__name__}); "
            "start every process (torchrun --nproc-per-node N ...), or unset WORLD_SIZE for "
            "one process (CROSSMAE_JOIN_TIMEOUT=S waits longer)"
        ) from None
    store.set_timeout(timedelta(minutes=30))
    return {"store": store, "rank": rank, "world_size": world}


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


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm for CPU processes (gloo), which torch's SyncBatchNorm does not run on: in
    distributed training the batch statistics are summed over processes with a differentiable
    all-reduce; otherwise a plain BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        C = x.shape[1]
        count = x.new_full((1,), x.numel() / C)
        stats = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count])
        stats = all_reduce(stats)  # (2C + 1,) summed over processes
        n = stats[-1]
        if n <= 1:
            raise ValueError("Expected more than 1 value per channel when training (SyncBN)")
        mean = stats[:C] / n
        var = stats[C : 2 * C] / n - mean * mean  # biased, for normalising
        with torch.no_grad():
            m = self.momentum
            self.num_batches_tracked.add_(1)
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var * n / (n - 1), alpha=m)
        shape = (1, C, 1, 1)
        x = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


def to_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` synchronised across processes (mmseg's SyncBN), weights
    kept: torch's SyncBatchNorm on GPUs, ``CpuSyncBatchNorm`` on the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            to_sync_batchnorm(child, device)
    return model
