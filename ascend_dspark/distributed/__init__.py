"""Tensor parallelism's collectives: the one place that calls torch.distributed at inference.

`TensorParallelGroup` is what a sharded model and the model runner talk to; `join` builds it
from torchrun's environment (or a spawner's) with the platform's backend."""

from .group import TensorParallelError, TensorParallelGroup, join, launched_by_torchrun, split_sizes
from .spawn import Watchdog, spawn_ranks

__all__ = ["TensorParallelError", "TensorParallelGroup", "Watchdog", "join", "launched_by_torchrun", "spawn_ranks",
           "split_sizes"]
