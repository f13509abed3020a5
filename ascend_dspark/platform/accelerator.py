"""What CUDA and Ascend NPU share: a device with its own torch module, streams, events and graphs.

`torch.cuda` and `torch.npu` (which torch_npu registers) offer the same functions under the
same names, so everything that differs between the two platforms only by that module is
written once here, against `self.device_module`. CudaPlatform and NpuPlatform keep what
really differs: their graph class, their identity and dtype, NPU detection and SoC choice.
tools/npu_contract checks these calls as torch.npu calls, against every supported
torch_npu release.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from .interface import Graph, Platform

logger = logging.getLogger(__name__)


class Accelerator(Platform):
    """A platform whose device work goes through `device_module` (torch.cuda or torch.npu)."""

    supports_graphs = True
    graph_steps = True
    overlap_steps = True
    kv_cache_from_memory = True
    supports_bf16_autocast = True
    graph_type: type[Graph]            # the subclass's graph, built as graph_type(pool)

    def __init__(self, index: int, device_module: ModuleType) -> None:
        super().__init__(index)
        self.device_module = device_module
        self._pool = None           # the platform's own graph pool, made on first use

    @property
    def device(self) -> torch.device:
        return torch.device(self.name, self.index)

    def synchronize(self) -> None:
        self.device_module.synchronize(self.index)

    def stream(self):
        return self.device_module.Stream(self.index)

    def current_stream(self):
        return self.device_module.current_stream(self.index)

    def stream_context(self, stream):
        return self.device_module.stream(stream)

    def event(self, enable_timing: bool = False):
        return self.device_module.Event(enable_timing=enable_timing)

    def graph(self, pool=None) -> Graph:
        if pool is None:
            if self._pool is None:
                self._pool = self.graph_pool()
            pool = self._pool
        return self.graph_type(pool)

    def graph_pool(self):
        return self.device_module.graph_pool_handle()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.device_module.manual_seed_all(seed)

    def pinned_empty(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        try:
            return torch.empty(size, dtype=dtype, pin_memory=True)
        except RuntimeError as exc:          # a runtime without a pinned-memory allocator
            _warn_unpinned(self.name, str(exc))
            return torch.empty(size, dtype=dtype)

    def memory_stats(self) -> dict[str, int]:
        free, total = self.device_module.mem_get_info(self.index)
        return {
            "allocated_bytes": self.device_module.memory_allocated(self.index),
            "reserved_bytes": self.device_module.memory_reserved(self.index),
            "peak_allocated_bytes": self.device_module.max_memory_allocated(self.index),
            "total_bytes": total,
            "free_bytes": free,
        }

    def empty_cache(self) -> None:
        self.device_module.empty_cache()


@functools.lru_cache(maxsize=None)
def _warn_unpinned(platform: str, why: str) -> None:
    logger.warning("%s: host buffers cannot be page-locked (%s); input copies to the device block instead",
                   platform, why)
