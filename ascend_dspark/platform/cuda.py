"""NVIDIA CUDA platform: bf16, CUDA streams and events, CUDA-graph capture and replay."""

from __future__ import annotations

from typing import Callable

import torch

from .interface import Graph, Platform


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


class CudaPlatform(Platform):
    name = "cuda"
    dist_backend = "nccl"
    op_backend = "triton"
    supports_graphs = True
    graph_steps = True
    overlap_steps = True
    kv_cache_from_memory = True
    supports_bf16_autocast = True

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        self._pool = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def describe(self) -> str:
        return f"cuda:{self.index} ({torch.cuda.get_device_name(self.index)}, torch {torch.__version__})"

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def stream(self):
        return torch.cuda.Stream(self.index)

    def current_stream(self):
        return torch.cuda.current_stream(self.index)

    def stream_context(self, stream):
        return torch.cuda.stream(stream)

    def event(self, enable_timing: bool = False):
        return torch.cuda.Event(enable_timing=enable_timing)

    def graph(self, pool=None) -> Graph:
        if pool is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            pool = self._pool
        return CudaGraph(pool)

    def graph_pool(self):
        return torch.cuda.graph_pool_handle()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def memory_stats(self) -> dict[str, int]:
        free, total = torch.cuda.mem_get_info(self.index)
        return {
            "allocated_bytes": torch.cuda.memory_allocated(self.index),
            "reserved_bytes": torch.cuda.memory_reserved(self.index),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(self.index),
            "total_bytes": total,
            "free_bytes": free,
        }

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()
