"""NVIDIA CUDA platform: torch.cuda behind the shared Accelerator surface, CUDA-graph capture and replay."""

from __future__ import annotations

from typing import Callable

import torch

from .accelerator import Accelerator
from .interface import Graph


class CudaGraph(Graph):
    """`torch.cuda.CUDAGraph` behind the `Graph` surface.

    Capture warms `fn` up on a side stream (so lazy initialisation is not captured), then
    records it. All captured graphs of a platform share one memory pool.
    """

    def __init__(self, pool) -> None:
        super().__init__()
        self._graph = torch.cuda.CUDAGraph()
        self._pool = pool

    def capture(self, fn: Callable[[], object], warmup: int = 2) -> object:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self._graph, pool=self._pool):
            out = fn()
        self._fn = fn
        return out

    def replay(self) -> None:
        self._graph.replay()

    def reset(self) -> None:
        self._graph.reset()
        self._fn = None


class CudaPlatform(Accelerator):
    name = "cuda"
    dist_backend = "nccl"
    dist_bind_device = True
    op_backend = "triton"
    graph_type = CudaGraph

    def __init__(self, index: int = 0) -> None:
        super().__init__(index, torch.cuda)

    def describe(self) -> str:
        return f"cuda:{self.index} ({torch.cuda.get_device_name(self.index)}, torch {torch.__version__})"
