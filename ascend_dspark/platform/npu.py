"""Huawei Ascend NPU platform via torch_npu: bf16, NPU streams and events, NPUGraph.

torch_npu is imported lazily and guarded: without Huawei's CANN runtime the import raises
ImportError (missing libhccl.so and friends), OSError or RuntimeError. Any of those means
"NPU unavailable"; the reason is kept for `ascend-dspark doctor` and error messages.
The API used here follows torch_npu 2.13's `torch_npu/npu/graphs.py` and `streams.py`
(`NPUGraph()`, `graph(npu_graph, pool=None, stream=None, auto_dispatch_capture=False,
capture_error_mode='global')`, `graph_pool_handle()`, `Stream`, `Event`); tests check it
against the real wheel.
"""

from __future__ import annotations

from typing import Callable

import torch

from .interface import Graph, Platform

_TORCH_NPU = None
_TORCH_NPU_ERROR: str | None = None


def load_torch_npu():
    """Import torch_npu once; return (module, None) or (None, reason)."""
    global _TORCH_NPU, _TORCH_NPU_ERROR
    if _TORCH_NPU is None and _TORCH_NPU_ERROR is None:
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)

            _TORCH_NPU = torch_npu
        except (ImportError, OSError, RuntimeError) as exc:
            _TORCH_NPU_ERROR = f"{type(exc).__name__}: {exc}"
    return _TORCH_NPU, _TORCH_NPU_ERROR


def npu_unavailable_reason() -> str | None:
    """None when an NPU can be used, else why not."""
    module, error = load_torch_npu()
    if module is None:
        return f"torch_npu cannot be imported ({error})"
    if not torch.npu.is_available():
        return "torch_npu imported but torch.npu.is_available() is False (no NPU visible)"
    return None


class NpuGraph(Graph):
    """`torch.npu.NPUGraph` behind the `Graph` surface.

    torch_npu's fused attention bakes host-side sequence lengths (actual_seq_lengths*) into
    a captured graph, which then need `NPUGraph.update` / task-group updates before each
    replay (see shared/reference/ascend.md). ops/backends/npu.py passes none: the lengths
    live in the device-side mask, so a replay only needs new data copied into the
    captured input buffers.
    """

    def __init__(self, pool) -> None:
        super().__init__()
        self._graph = torch.npu.NPUGraph()
        self._pool = pool

    def capture(self, fn: Callable[[], object], warmup: int = 2) -> object:
        side = torch.npu.Stream()
        side.wait_stream(torch.npu.current_stream())
        with torch.npu.stream(side):
            for _ in range(warmup):
                fn()
        torch.npu.current_stream().wait_stream(side)
        with torch.npu.graph(self._graph, pool=self._pool):
            out = fn()
        self._fn = fn
        return out

    def replay(self) -> None:
        self._graph.replay()

    def reset(self) -> None:
        self._graph.reset()
        self._fn = None


class NpuPlatform(Platform):
    name = "npu"
    dist_backend = "hccl"
    op_backend = "npu"
    supports_graphs = True
    supports_bf16_autocast = True

    def __init__(self, index: int = 0) -> None:
        reason = npu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"Ascend NPU requested but unavailable: {reason}")
        super().__init__(index)
        self._pool = None

    @property
    def device(self) -> torch.device:
        return torch.device("npu", self.index)

    def describe(self) -> str:
        return f"npu:{self.index} ({torch.npu.get_device_name(self.index)}, torch {torch.__version__})"

    def synchronize(self) -> None:
        torch.npu.synchronize(self.index)

    def stream(self):
        return torch.npu.Stream(self.index)

    def current_stream(self):
        return torch.npu.current_stream(self.index)

    def stream_context(self, stream):
        return torch.npu.stream(stream)

    def event(self, enable_timing: bool = False):
        return torch.npu.Event(enable_timing=enable_timing)

    def graph(self) -> Graph:
        if self._pool is None:
            self._pool = torch.npu.graph_pool_handle()
        return NpuGraph(self._pool)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.npu.manual_seed_all(seed)

    def memory_stats(self) -> dict[str, int]:
        free, total = torch.npu.mem_get_info(self.index)
        return {
            "allocated_bytes": torch.npu.memory_allocated(self.index),
            "reserved_bytes": torch.npu.memory_reserved(self.index),
            "peak_allocated_bytes": torch.npu.max_memory_allocated(self.index),
            "total_bytes": total,
            "free_bytes": free,
        }

    def empty_cache(self) -> None:
        torch.npu.empty_cache()
