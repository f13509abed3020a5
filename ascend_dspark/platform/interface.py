"""The device as a class with a small, named surface.

Everything device-specific the engine needs (which device, which dtype, how to wait, how
to time, how to capture and replay a step, which collective backend) is asked of a
`Platform`. Code outside `ascend_dspark/platform/` and `ops/` never touches `torch.cuda`
or `torch_npu`.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

from ops.registry import OpRegistry

logger = logging.getLogger(__name__)


class Graph:
    """A captured step that can be replayed.

    `capture(fn)` runs `fn` once to record it; `replay()` re-runs the recorded work on the
    same (static) input and output buffers. This eager version simply calls `fn` again:
    it is the CPU behaviour and the reference the device graphs must match.
    """

    def __init__(self) -> None:
        self._fn: Callable[[], object] | None = None

    def capture(self, fn: Callable[[], object]) -> object:
        self._fn = fn
        return fn()

    def replay(self) -> None:
        if self._fn is None:
            raise RuntimeError("Graph.replay() called before capture()")
        self._fn()

    def reset(self) -> None:
        self._fn = None


class Platform:
    """Base class: one subclass per device kind (cpu, cuda, npu)."""

    name: str = "base"
    dist_backend: str = "gloo"
    # torch.distributed binds the process group to this device at init (NCCL's eager
    # communicator set-up: no lazy init inside a graph capture)
    dist_bind_device: bool = False
    supports_graphs: bool = False
    # The engine replays whole decode steps as graphs by default (engine/graph_runner.py).
    graph_steps: bool = False
    # Why a platform that has graphs runs steps eagerly (a graph API missing, a failed
    # self-test: `disable_graphs`); shown by `doctor` and the engine's message.
    graphs_disabled_reason: str | None = None
    # The engine sizes its KV cache from a fraction of this device's memory (not on the host,
    # whose memory is shared with everything else: there the block count is a flag).
    kv_cache_from_memory: bool = False
    # The device runs queued work while the host goes on (CUDA / NPU streams): the engine
    # launches a decode batch's next step before reading the last one's results.
    overlap_steps: bool = False
    supports_bf16_autocast: bool = False   # torch.autocast(device.type, bfloat16) is worth it for training
    op_backend: str = "reference"      # which ops/ backend serves this device
    kv_block_size: int = 16            # paged-KV block size this device's attention kernels want

    def __init__(self, index: int = 0) -> None:
        self.index = index

    # -- identity ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @functools.cached_property
    def ops(self) -> OpRegistry:
        """The ops of this platform: tensors on its device run its `op_backend` (fixed once the
        platform is built), handed to models through their forward context."""
        return OpRegistry(self.device.type, self.op_backend)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def describe(self) -> str:
        return self.name

    # -- execution --------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait until all queued device work is done (a no-op on CPU)."""

    def stream(self):
        """A new side stream (None on CPU, where work is synchronous)."""
        return None

    def current_stream(self):
        return None

    def stream_context(self, stream):
        """Context manager that makes `stream` current."""
        import contextlib

        return contextlib.nullcontext()

    def event(self, enable_timing: bool = False) -> "HostEvent":
        return HostEvent()

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise ValueError when this device cannot compute in `dtype` (every dtype works here)."""

    def disable_graphs(self, why: str) -> None:
        """Run steps eagerly on this platform from now on (its graphs failed the self-test):
        the engine then builds no graph runner. Logged once."""
        if self.graphs_disabled_reason is None:
            logger.warning("%s: device graphs off, steps run eagerly: %s", self.name, why)
        self.graphs_disabled_reason = why
        self.supports_graphs = self.graph_steps = False

    def graph(self, pool=None) -> Graph:
        """A graph recorder; graphs given the same `pool` (from `graph_pool()`) share memory,
        None shares the platform's own pool."""
        return Graph()

    def graph_pool(self):
        """A fresh memory pool for a set of graphs replayed one at a time (a graph runner's)."""
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    # -- memory -----------------------------------------------------------------------
    def pinned_empty(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer the device can copy from asynchronously (page-locked on an
        accelerator); plain memory here, where nothing is copied to a device."""
        return torch.empty(size, dtype=dtype)

    def memory_stats(self) -> dict[str, int]:
        return {"allocated_bytes": 0, "reserved_bytes": 0, "peak_allocated_bytes": 0, "total_bytes": 0}

    def empty_cache(self) -> None:
        """Give cached device memory back to the driver."""


class HostEvent:
    """Event with the device-event surface, timed on the host clock (CPU)."""

    def __init__(self) -> None:
        self._t: float | None = None

    def record(self, stream=None) -> None:
        import time

        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds between this event and `end`, like torch.cuda.Event."""
        if self._t is None or end._t is None:
            raise RuntimeError("both events must be recorded before elapsed_time()")
        return (end._t - self._t) * 1e3
