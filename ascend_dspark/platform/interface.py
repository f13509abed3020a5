"""The device as a class with a small, named surface.

Everything device-specific the engine needs (which device, which dtype, how to wait, how
to time, how to capture and replay a step, which collective backend) is asked of a
`Platform`. Code outside `ascend_dspark/platform/` and `ops/` never touches `torch.cuda`
or `torch_npu`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Sequence

import torch


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
    supports_graphs: bool = False
    # The engine replays whole decode steps as graphs by default (engine/graph_runner.py).
    graph_steps: bool = False
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

    def wait(self, stream=None) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds between this event and `end`, like torch.cuda.Event."""
        if self._t is None or end._t is None:
            raise RuntimeError("both events must be recorded before elapsed_time()")
        return (end._t - self._t) * 1e3


# -- host-side attention facts ---------------------------------------------------------------
ATTENTION_KINDS = ("explicit", "causal", "prefix")


class AttentionHints:
    """What the host knows about the attention of one forward, for kernels that take sequence
    lengths as host integers (Ascend's fused attention) instead of reading the mask back.

    Attention calls made inside `with attention_hints(h):` may rely on `h`; without hints
    such kernels attend over all S = mask.shape[-1] keys of every row and let the mask hide
    the rest (always right, slower for short rows). Devices whose kernels read the mask
    (CPU, CUDA) ignore hints.

    kv_lengths[b]     keys row b can reach: 1 + the largest key index any of its queries
                      sees, <= S. Keys at or past it are invisible to every query of row b.
    query_lengths[b]  real queries of row b, the rest right padding (default: all T).
    kind              what the forward's masks look like (a promise for EVERY mask in it):
      "explicit"  anything (sliding windows, ...): the mask is passed in full;
      "causal"    right-down causal over these lengths, no sliding window: query
                  t < query_lengths[b] sees keys s <= kv_lengths[b] - query_lengths[b] + t
                  (prefill chunks, verification); padding queries are don't-care;
      "prefix"    every query of row b sees exactly keys 0 .. kv_lengths[b] - 1
                  (DFlash/DSpark block drafting, plain decode).

    A graph captured under hints keeps this object: before `Graph.replay()`, `update()` it
    in place with the next step's lengths, as new inputs are copied into the static input
    tensors; the platform's graph hands the new values to its attention before replaying.
    """

    def __init__(self, kv_lengths: Sequence[int], query_lengths: Sequence[int] | None = None,
                 kind: str = "explicit") -> None:
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention hint kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        self.kind = kind
        self.kv_lengths: list[int] = []
        self.query_lengths: list[int] | None = None
        self._set(kv_lengths, query_lengths)

    @property
    def batch(self) -> int:
        return len(self.kv_lengths)

    def update(self, kv_lengths: Sequence[int], query_lengths: Sequence[int] | None = None) -> None:
        """New lengths for the same rows (a captured graph's batch size never changes)."""
        if len(kv_lengths) != self.batch:
            raise ValueError(f"attention hints: {len(kv_lengths)} rows given, captured with {self.batch}")
        self._set(kv_lengths, query_lengths)

    def _set(self, kv_lengths, query_lengths) -> None:
        kv = [int(n) for n in kv_lengths]
        q = None if query_lengths is None else [int(n) for n in query_lengths]
        if not kv or min(kv) < 1:
            raise ValueError(f"attention hints: kv_lengths must be >= 1 for every row, got {kv}")
        if q is not None and (len(q) != len(kv) or min(q) < 1 or any(a > b for a, b in zip(q, kv))):
            raise ValueError(f"attention hints: query_lengths {q} must be 1..kv_length per row ({kv})")
        self.kv_lengths, self.query_lengths = kv, q

    def __repr__(self) -> str:
        return f"AttentionHints(kv_lengths={self.kv_lengths}, query_lengths={self.query_lengths}, kind={self.kind!r})"


_ATTENTION_HINTS: contextvars.ContextVar[AttentionHints | None] = contextvars.ContextVar(
    "ascend_dspark_attention_hints", default=None)


@contextlib.contextmanager
def attention_hints(hints: AttentionHints | None) -> Iterator[AttentionHints | None]:
    """Make `hints` the attention facts of the calls inside the block (None: none)."""
    token = _ATTENTION_HINTS.set(hints)
    try:
        yield hints
    finally:
        _ATTENTION_HINTS.reset(token)


def current_attention_hints() -> AttentionHints | None:
    return _ATTENTION_HINTS.get()
