"""Data parallelism through torch.distributed, as `torchrun --nproc-per-node N` sets it up.

`init(platform)` joins the process group named by torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) with the platform's collective backend (gloo / nccl / hccl);
without that environment everything here is the identity and training is one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(backend: str) -> None:
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group(backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over `module` when several ranks train; the module itself otherwise."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type != "cpu" and device.index is not None else None
    return DistributedDataParallel(module, device_ids=ids)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
