"""Huawei Ascend NPU platform via torch_npu: SoC-dependent dtype and ops, NPUGraph with task updates.

torch_npu is imported lazily and guarded: without Huawei's CANN runtime the import raises
ImportError (missing libhccl.so and friends), OSError or RuntimeError. Any of those means
"NPU unavailable"; the reason is kept for `ascend-dspark doctor` and error messages.
The API used here follows torch_npu's `torch_npu/npu/graphs.py`, `streams.py` and
`_backends.py` (`NPUGraph()`, `graph(npu_graph, pool=None, stream=None,
auto_dispatch_capture=False, capture_error_mode='global')`, `graph_task_update_begin(stream,
handle)`, `ExternalEvent`, `get_soc_version()` ...), whose signatures are the same in every
supported release (2.6.0 to 2.14.0); tests check every call against each release's wheel
(tools/npu_contract, tests/platform/test_npu_matrix.py). Graph steps need the graph
task update API (`GRAPH_APIS`): a torch_npu without one of them runs eagerly, with a warning
naming the release (decided by hasattr, not by the version string).

SoC. `torch.npu.get_soc_version()` returns torch_npu's `c10_npu::SocVersion` as an int
(torch_npu/csrc/core/npu/NpuVariables.h): 100-104 the first Ascend 910 (910PremiumA / ProA
/ A / ProB / B), 200-206 Ascend 310P, 220-225 Atlas A2 (Ascend910B1..B4_1), 240-243 Ascend
310B, 250-255 Atlas A3 (Ascend910_9391..9362, "910C"), 260 Ascend 950 (A5). Only A2 and
A3 have both bfloat16 and the fused kernels ops/backends/npu.py calls (their docs list
A2/A3); there the platform picks bfloat16 and the "npu" ops. Every other SoC gets the
reference ops; the 910 / 310P / 310B lines have no bfloat16 (`IsBF16Supported()` is true
from Ascend910B1 on) and get float16, Ascend 950 keeps bfloat16. The choice is announced
in one log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .accelerator import Accelerator
from .interface import Graph, Platform

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class SocProfile:
    """What one Ascend SoC gets: its dtype, whether the fused torch_npu kernels run, and
    whether NPU graphs (aclgraph capture / task update) are supported there."""

    version: int
    name: str
    family: str
    dtype: torch.dtype
    fused_ops: bool
    graphs: bool = False

    @property
    def has_bf16(self) -> bool:
        return self.dtype == torch.bfloat16


# (first, last) SocVersion value -> family, whether bf16 exists, whether the fused kernels are
# documented, whether NPU graphs are (Atlas A2 / A3 and newer)
_SOC_FAMILIES = (
    (100, 104, "Ascend910 (first generation)", False, False, False),
    (200, 206, "Ascend310P", False, False, False),
    (220, 225, "Atlas A2 (Ascend910B)", True, True, True),
    (240, 243, "Ascend310B", False, False, False),
    (250, 255, "Atlas A3 (Ascend910_93)", True, True, True),
    (260, 260, "Ascend950 (A5)", True, False, True),
)
SOC_NAMES = {
    100: "Ascend910PremiumA", 101: "Ascend910ProA", 102: "Ascend910A", 103: "Ascend910ProB", 104: "Ascend910B",
    200: "Ascend310P1", 201: "Ascend310P2", 202: "Ascend310P3", 203: "Ascend310P4", 204: "Ascend310P5",
    205: "Ascend310P7", 206: "Ascend310P7",
    220: "Ascend910B1", 221: "Ascend910B2", 222: "Ascend910B2C", 223: "Ascend910B3", 224: "Ascend910B4",
    225: "Ascend910B4_1", 240: "Ascend310B1", 241: "Ascend310B2", 242: "Ascend310B3", 243: "Ascend310B4",
    250: "Ascend910_9391", 251: "Ascend910_9392", 252: "Ascend910_9381", 253: "Ascend910_9382",
    254: "Ascend910_9372", 255: "Ascend910_9362", 260: "Ascend950",
}


def soc_profile(version: int) -> SocProfile:
    """The dtype / op choice for a `torch.npu.get_soc_version()` value (unknown: float16, reference)."""
    version = int(version)
    name = SOC_NAMES.get(version, f"SocVersion {version}")
    for first, last, family, bf16, fused, graphs in _SOC_FAMILIES:
        if first <= version <= last:
            return SocProfile(version, name, family, torch.bfloat16 if bf16 else torch.float16, fused, graphs)
    return SocProfile(version, name, "unknown Ascend SoC", torch.float16, False)


# -- graphs ------------------------------------------------------------------------------
@dataclass
class GraphTask:
    """One kernel captured in its own task group, whose host arguments change between replays.

    `launch(*prepare())` issues the kernel (an `.out` overload writing into the captured
    outputs) with the host values `prepare()` computes: once inside the capture and again,
    between `graph_task_update_begin/end`, before every replay. `prepare` runs before the
    section opens, so a bad value raises with no update section open."""

    handle: object
    event: object
    launch: Callable[..., object]
    prepare: Callable[[], tuple]


class NpuGraph(Graph):
    """`torch.npu.NPUGraph` behind the `Graph` surface.

    Capture launches nothing on the device: tensors the captured step allocates hold
    garbage until the first replay, so `capture()` replays once before returning (after
    the warmup runs, which do execute).

    torch_npu's fused attention takes sequence lengths as host integers that a captured
    graph bakes in. ops/backends/npu.py therefore captures each attention call in its own
    task group (`capture_task`, reached through the forward context's `graph`) and, before
    every replay, this graph re-issues those calls with the current lengths through the documented graph task update (torch_npu 2.13,
    test/npu/test_aclgraph_update.py; shared/reference/ascend.md 1.3):

        capture:  event.wait(stream); event.reset(stream)           ExternalEvent
                  graph_task_group_begin(stream); launch(); handle = graph_task_group_end(stream)
        replay:   update_stream.wait_stream(current_stream)          the last replay is done with them
                  with torch.npu.stream(update_stream):
                      graph_task_update_begin(update_stream, handle); launch(); graph_task_update_end(update_stream)
                      event.record(update_stream)                    the replay's kernel waits for it
                  NPUGraph.replay()

    The ordering is device-side (stream waits and the external event), so the host never
    synchronises between steps.
    """

    def __init__(self, pool) -> None:
        super().__init__()
        self._graph = torch.npu.NPUGraph()
        self._pool = pool
        self._tasks: list[GraphTask] = []
        self._update_stream = None
        self._capturing = False
        self._workspace: torch.Tensor | None = None

    def shared_workspace(self, needed: torch.Tensor) -> torch.Tensor:
        """One scratch workspace for every fused-attention task of this graph, the largest
        asked for: the tasks run one after another on one stream, so they can share it, and
        a graph keeps ~1 workspace instead of one per attention call (50 per step graph)."""
        if self._workspace is None or self._workspace.numel() < needed.numel():
            self._workspace = needed
        return self._workspace

    def capture(self, fn: Callable[[], object], warmup: int = 2) -> object:
        side = torch.npu.Stream()
        side.wait_stream(torch.npu.current_stream())
        with torch.npu.stream(side):
            for _ in range(warmup):
                fn()
        torch.npu.current_stream().wait_stream(side)
        self._capturing = True
        try:
            with torch.npu.graph(self._graph, pool=self._pool):
                out = fn()
        finally:
            self._capturing = False
        self._fn = fn
        self.replay()          # capture computed nothing: the outputs are garbage until a replay
        return out

    def capture_task(self, launch: Callable[..., object], prepare: Callable[[], tuple] = tuple) -> None:
        """Issue `launch(*prepare())` now, inside the capture, as an updatable task group (see above)."""
        if not self._capturing or not torch.npu.is_current_stream_capturing():
            raise RuntimeError("NpuGraph.capture_task() is only valid while this graph is capturing")
        stream = torch.npu.current_stream()
        event = torch.npu.ExternalEvent()
        event.wait(stream)
        event.reset(stream)
        args = prepare()
        torch.npu.graph_task_group_begin(stream)
        launch(*args)
        handle = torch.npu.graph_task_group_end(stream)
        self._tasks.append(GraphTask(handle, event, launch, prepare))

    def _update_tasks(self) -> None:
        if self._update_stream is None:
            self._update_stream = torch.npu.Stream()
        stream = self._update_stream
        stream.wait_stream(torch.npu.current_stream())
        with torch.npu.stream(stream):
            for task in self._tasks:
                args = task.prepare()        # host values first, outside the update section
                torch.npu.graph_task_update_begin(stream, task.handle)
                try:
                    task.launch(*args)
                finally:                     # an open update section would poison the stream
                    torch.npu.graph_task_update_end(stream)
                task.event.record(stream)

    def replay(self) -> None:
        if self._tasks:
            self._update_tasks()
        self._graph.replay()

    def reset(self) -> None:
        self._graph.reset()
        self._fn = None
        self._tasks = []


# What graph steps use (NpuGraph): without any of them the platform runs eagerly.
GRAPH_APIS = ("NPUGraph", "graph", "graph_pool_handle", "is_current_stream_capturing", "ExternalEvent",
              "graph_task_group_begin", "graph_task_group_end", "graph_task_update_begin", "graph_task_update_end")


def missing_graph_apis() -> list[str]:
    """The GRAPH_APIS this torch_npu lacks (capability by hasattr; empty on 2.6.0 .. 2.14.0)."""
    return [name for name in GRAPH_APIS if not hasattr(torch.npu, name)]


class NpuPlatform(Accelerator):
    name = "npu"
    dist_backend = "hccl"
    op_backend = "npu"
    graph_type = NpuGraph
    kv_block_size = 128     # FIA's paged form needs a multiple of 128 in [128, 512] for Q_S > 1

    def __init__(self, index: int = 0) -> None:
        reason = npu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"Ascend NPU requested but unavailable: {reason}")
        super().__init__(index, torch.npu)
        missing = missing_graph_apis()
        if missing:
            self.supports_graphs = self.graph_steps = False
            release = getattr(_TORCH_NPU, "__version__", "?")
            self.graphs_disabled_reason = f"torch_npu {release} lacks {', '.join(missing)}"
            logger.warning("npu: torch_npu %s lacks %s: NPU graphs off, steps run eagerly", release, ", ".join(missing))
        self.soc = soc_profile(torch.npu.get_soc_version())
        self.supports_bf16_autocast = self.soc.has_bf16
        soc = f"{self.soc.name} ({self.soc.family}, SoC {self.soc.version})"
        if not self.soc.graphs and self.supports_graphs:
            self.supports_graphs = self.graph_steps = self.overlap_steps = False
            self.graphs_disabled_reason = f"{soc} does not support NPU graphs (Atlas A2 / A3 and newer do)"
            logger.warning("npu: %s: NPU graphs and overlap off, steps run eagerly", self.graphs_disabled_reason)
        if self.soc.fused_ops:
            self.op_backend = "npu"
            logger.info("npu: %s: using %s and the fused torch_npu kernels", soc, _dtype_name(self.soc.dtype))
        else:
            self.op_backend = "reference"
            self.kv_block_size = Platform.kv_block_size
            lacks = "lacks the fused torch_npu kernels" if self.soc.has_bf16 else \
                "has no bfloat16 and lacks the fused torch_npu kernels"
            logger.warning("npu: %s %s (documented for Atlas A2/A3 only): using %s and the reference ops",
                           soc, lacks, _dtype_name(self.soc.dtype))

    def default_dtype(self) -> torch.dtype:
        return self.soc.dtype

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype == torch.bfloat16 and not self.soc.has_bf16:
            raise ValueError(f"{self.soc.name} ({self.soc.family}) has no bfloat16: use float16 (its default) "
                             "or float32")

    def describe(self) -> str:
        return (f"npu:{self.index} ({torch.npu.get_device_name(self.index)}, {self.soc.family}, "
                f"{_dtype_name(self.soc.dtype)}, {self.op_backend} ops, torch {torch.__version__})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
