"""TEST DOUBLE, not torch_npu: a CPU stand-in for `torch.npu` (torch_npu 2.13.0 `torch_npu/npu/*.py`).

Why: NpuPlatform, its graph runner and the attention-update path must be exercised in CI
without an NPU. Every public name here has the REAL signature recorded in the contract
snapshot (a test compares them with inspect.signature), so code written against this
double calls the real API the same way.

Work runs eagerly on CPU tensors; streams are tokens. NPUGraph emulates graph semantics
rather than just calling back: capture records every dispatched op (TorchDispatchMode) on
the tensors it used, and replay re-runs those ops on the same tensors, writing results
into the tensors captured outputs live in. So, as on the device, replay sees new data only
if it was copied into the captured input tensors, host values (Python ints, seq-length
lists) stay baked in, and `NPUGraph.update()` / `graph_task_update_*` are the only way to
change them. Hardware rules that are cheap to check are enforced: capture on a
non-default stream, one capture per graph, no host sync (synchronize, .item()) while
capturing, TASK_QUEUE_ENABLE != 2. Unlike the device, ops also execute during capture.

Each NPUGraph keeps `events` (capture_begin, capture_end, update, task_update, replay,
reset, in order); the runtime keeps a global `log` of stream/event/task-group calls.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ascend_dspark.platform.npu_contract import SNAPSHOT_APIS

DEVICE_NAME = "Ascend910B3 (fake_torch_npu test double)"
_CAPTURE_MODES = ("global", "thread_local", "relaxed")
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}
_ALLOC_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty"}  # launch no task
# Ops that NPUGraph.update() can patch (torch_npu/npu/_npugraph_handlers/ifa_handler.py, v1).
_UPDATABLE = {"npu::npu_fused_infer_attention_score"}


class _Runtime:
    """Per-install state; `install()` creates a fresh one."""

    def __init__(self, device_count: int = 1, total_memory: int = 64 << 30, free_memory: int = 60 << 30):
        self.device_count = device_count
        self.total_memory, self.free_memory = total_memory, free_memory
        self.device = 0
        self.default: dict[int, Stream] = {}
        self.current: dict[int, Stream] = {}
        self.capturing: NPUGraph | None = None
        self.capture_stream: Stream | None = None
        self.open_group: _TaskGroup | None = None
        self.updating: tuple[_TaskGroup, _Recorder] | None = None
        self.seed: int | None = None
        self.n_pools = 0
        self.log: list[tuple] = []


_RT: _Runtime | None = None


def _rt() -> _Runtime:
    if _RT is None:
        raise RuntimeError("fake torch.npu used outside fake_torch_npu.install()")
    return _RT


def _index(device) -> int:
    if device is None:
        return _rt().device
    if isinstance(device, str):
        kind, _, idx = device.partition(":")
        if kind != "npu":
            raise ValueError(f"expected an npu device, got {device!r}")
        idx = int(idx) if idx else _rt().device
    elif isinstance(device, torch.device):
        idx = device.index if device.index is not None else _rt().device
    else:
        idx = int(device)
    if not 0 <= idx < _rt().device_count:
        raise AssertionError(f"Invalid device id {idx} (the fake has {_rt().device_count})")
    return idx


def _no_sync(what: str) -> None:
    if _rt().capturing is not None:
        raise RuntimeError(f"{what} during NPU graph capture: the host may not wait on a captured stream "
                           "(real torch_npu fails with ACL error 107027 'stream is captured')")


# -- device ----------------------------------------------------------------------------
def is_available():
    return True


def device_count():
    return _rt().device_count


def get_device_name(device_name=None):
    _index(device_name)
    return DEVICE_NAME


def set_device(device):
    _rt().device = _index(device)


def current_device():
    return _rt().device


def synchronize(device=None):
    _no_sync("torch.npu.synchronize()")
    _rt().log.append(("synchronize", _index(device)))


# -- streams and events ----------------------------------------------------------------
class Stream:
    def __init__(self, device=None, priority=0, **kwargs):
        self.device_index = _index(device)
        self.priority = priority
        self.stream_id = kwargs.get("stream_id", id(self))

    def wait_event(self, event):
        _rt().log.append(("wait_event", self, event))

    def wait_stream(self, stream):
        _rt().log.append(("wait_stream", self, stream))

    def record_event(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def query(self):
        return True

    def synchronize(self):
        _no_sync("Stream.synchronize()")

    def set_data_preprocess_stream(self, is_data_preprocess_stream=False):
        self.data_preprocess = is_data_preprocess_stream

    def __repr__(self):
        return f"<fake torch.npu.Stream device=npu:{self.device_index} id={self.stream_id}>"


class _StreamContext:
    def __init__(self, stream):
        self.stream = stream
        self.prev = None

    def __enter__(self):
        if self.stream is not None:
            self.prev = current_stream(self.stream.device_index)
            _rt().current[self.stream.device_index] = self.stream
        return self.stream

    def __exit__(self, *exc):
        if self.stream is not None:
            _rt().current[self.stream.device_index] = self.prev


def default_stream(device=None):
    idx = _index(device)
    return _rt().default.setdefault(idx, Stream(idx, stream_id=0))


def current_stream(device=None):
    idx = _index(device)
    return _rt().current.get(idx) or default_stream(idx)


def stream(stream):
    return _StreamContext(stream)


class Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.enable_timing = enable_timing
        self._t: float | None = None

    @classmethod
    def from_ipc_handle(cls, device, handle):
        raise NotImplementedError("Event.from_ipc_handle: IPC is not implemented by the test double")

    def record(self, stream=None):
        self._t = time.perf_counter()
        _rt().log.append(("event_record", self, stream or current_stream()))

    def wait(self, stream=None):
        _rt().log.append(("event_wait", self, stream or current_stream()))

    def query(self):
        return True

    def elapsed_time(self, end_event):
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'")
        if self._t is None or end_event._t is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time")
        return (end_event._t - self._t) * 1e3

    def recorded_time(self):
        raise NotImplementedError("Event.recorded_time is not implemented by the test double")

    def synchronize(self):
        _no_sync("Event.synchronize()")

    def ipc_handle(self):
        raise NotImplementedError("Event.ipc_handle: IPC is not implemented by the test double")


class ExternalEvent:
    """Graph-ordering event (may be waited before it is recorded; reset before reuse)."""

    def __init__(self):
        pass

    def record(self, stream=None):
        _rt().log.append(("external_record", self, stream or current_stream()))

    def wait(self, stream=None):
        _rt().log.append(("external_wait", self, stream or current_stream()))

    def reset(self, stream=None):
        _rt().log.append(("external_reset", self, stream or current_stream()))


# -- graph recording -------------------------------------------------------------------
@dataclass
class _Record:
    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    out: object
    kind: str  # "functional" (re-run, copy into out) | "mutating" (re-run) | "view" (skip)
    updatable: bool = False


@dataclass
class _TaskGroup:
    graph: "NPUGraph"
    start: int
    records: list = field(default_factory=list)


def _freeze(value):
    """Host containers are baked at capture (copied); tensors stay by reference (addresses)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _kind(func) -> str:
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return "mutating"
    if any(r.alias_info is not None for r in schema.returns):
        return "view"
    return "functional"


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor):
        if dst is not src:
            dst.copy_(src)
    elif isinstance(dst, (list, tuple)) and isinstance(src, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


class _Recorder(TorchDispatchMode):
    """Runs each op and keeps (op, args, kwargs, outputs) for replay."""

    def __init__(self, graph: "NPUGraph | None"):
        super().__init__()
        self.graph = graph
        self.records: list[_Record] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in _SYNC_OPS:
            raise RuntimeError(f"{func._schema.name} reads device data on the host during NPU graph capture "
                               "(real torch_npu fails with ACL error 107027 'stream is captured')")
        out = func(*args, **kwargs)
        rec = _Record(func, _freeze(args), _freeze(kwargs), out, _kind(func))
        self.records.append(rec)
        graph = self.graph
        rec.updatable = graph is not None and graph.auto_dispatch_capture and func._schema.name in _UPDATABLE
        return out


def _tasks(records) -> list[_Record]:
    """The records that are device tasks (not views or bare allocations)."""
    return [r for r in records if r.kind != "view" and r.func._schema.name not in _ALLOC_OPS]


def _run(records) -> None:
    with torch.no_grad():
        for rec in records:
            if rec.kind == "view":
                continue
            result = rec.func(*rec.args, **rec.kwargs)
            if rec.kind == "functional":
                _copy_into(rec.out, result)


class NPUGraph:
    def __init__(self):
        self.auto_dispatch_capture = False
        self.events: list[tuple[str, dict]] = []
        self._recorder: _Recorder | None = None
        self._records: list[_Record] | None = None
        self._pool = None

    def capture_begin(self, pool=None, capture_error_mode="global"):
        rt = _rt()
        if capture_error_mode not in _CAPTURE_MODES:
            raise RuntimeError(f"capture_error_mode must be one of {_CAPTURE_MODES}, got {capture_error_mode!r}")
        if os.environ.get("TASK_QUEUE_ENABLE") == "2":
            raise RuntimeError("Do not support TASK_QUEUE_ENABLE = 2 during NPU graph capture, "
                               "please export TASK_QUEUE_ENABLE=1/0.")
        if self._records is not None or self._recorder is not None:
            raise RuntimeError("This NPUGraph instance already owns a captured graph. "
                               "To capture a new graph, create a new instance.")
        if rt.capturing is not None:
            raise RuntimeError("another NPU graph capture is already underway")
        if current_stream() is default_stream():
            raise RuntimeError("NPU graphs must be captured on a non-default stream. "
                               "(However, after capture, it's ok to replay them on the default stream.)")
        self._pool = pool if pool is not None else graph_pool_handle()
        self._recorder = _Recorder(self)
        rt.capturing = self
        self._recorder.__enter__()
        self.events.append(("capture_begin", {"pool": pool, "capture_error_mode": capture_error_mode,
                                              "stream": current_stream()}))

    def capture_end(self):
        rt = _rt()
        if rt.capturing is not self:
            raise RuntimeError("capture_end() without a matching capture_begin() on this graph")
        self._recorder.__exit__(None, None, None)
        rt.capturing = None
        self._records, self._recorder = self._recorder.records, None
        if rt.open_group is not None:
            rt.open_group = None
            raise RuntimeError("graph_task_group_begin() without graph_task_group_end() in the capture")
        self.events.append(("capture_end", {"ops": len(self._records)}))

    def replay(self):
        if self._records is None:
            raise RuntimeError("NPUGraph.replay() needs a completed capture")
        if _rt().capturing is not None:
            raise RuntimeError("NPUGraph.replay() while another graph is being captured")
        _run(self._records)
        self.events.append(("replay", {}))

    def reset(self):
        self._records = None
        self.events.append(("reset", {}))

    def pool(self):
        return self._pool

    def update(self, cpu_update_input):
        if not self.auto_dispatch_capture:
            raise RuntimeError("The current graph configuration does not support update,"
                               "Try to capture by setting auto_dispatch_capture=True during capture")
        records = [r for r in self._records or () if r.updatable]
        if len(cpu_update_input) == 1:
            cpu_update_input = [dict(cpu_update_input[0]) for _ in records]
        if len(cpu_update_input) != len(records):
            raise RuntimeError(f"Currently, there are {len(records)} operators that need to be updated by capture, "
                               f"and there are only {len(cpu_update_input)} elements in the incoming "
                               "cpu_update_input list")
        for rec, new in zip(records, cpu_update_input):
            for key, value in new.items():
                if key in rec.kwargs:  # as the real skeleton: keys absent at capture are ignored
                    rec.kwargs[key] = _freeze(value)
        self.events.append(("update", {"inputs": _freeze(list(cpu_update_input))}))

    def debug_dump(self, debug_path):
        raise NotImplementedError("NPUGraph.debug_dump is not implemented by the test double")

    def super_kernel_optimize(self, optimize_options=None, debug_options=None):
        raise NotImplementedError("NPUGraph.super_kernel_optimize is not implemented by the test double")


class graph:
    def __init__(self, npu_graph, pool=None, stream=None, auto_dispatch_capture=False,
                 capture_error_mode="global"):
        rt = _rt()
        if rt.capture_stream is None:
            rt.capture_stream = Stream()
        self.pool = () if pool is None else (pool,)
        self.capture_stream = stream if stream is not None else rt.capture_stream
        self.stream_ctx = _StreamContext(self.capture_stream)
        self.npu_graph = npu_graph
        self.capture_error_mode = capture_error_mode
        self.npu_graph.auto_dispatch_capture = auto_dispatch_capture

    def __enter__(self):
        synchronize()
        empty_cache()
        self.stream_ctx.__enter__()
        self.npu_graph.capture_begin(*self.pool, capture_error_mode=self.capture_error_mode)

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            self.npu_graph.capture_end()
        finally:
            self.stream_ctx.__exit__(exc_type, exc_value, traceback)


def graph_pool_handle():
    _rt().n_pools += 1
    return (0, _rt().n_pools)


def is_current_stream_capturing():
    return _rt().capturing is not None


def graph_task_group_begin(stream):
    rt = _rt()
    if rt.capturing is None or rt.open_group is not None:
        raise RuntimeError("graph_task_group_begin() needs an active capture and no open task group")
    rt.open_group = _TaskGroup(rt.capturing, len(rt.capturing._recorder.records))
    rt.log.append(("task_group_begin", stream))


def graph_task_group_end(stream):
    rt = _rt()
    group = rt.open_group
    if group is None or rt.capturing is not group.graph:
        raise RuntimeError("graph_task_group_end() without graph_task_group_begin() in this capture")
    group.records = _tasks(group.graph._recorder.records[group.start:])
    rt.open_group = None
    rt.log.append(("task_group_end", stream))
    return group


def graph_task_update_begin(stream, handle):
    rt = _rt()
    if rt.updating is not None or rt.capturing is not None or not isinstance(handle, _TaskGroup):
        raise RuntimeError("graph_task_update_begin() needs a task-group handle, outside capture and other updates")
    recorder = _Recorder(None)
    rt.updating = (handle, recorder)
    recorder.__enter__()
    rt.log.append(("task_update_begin", stream))


def graph_task_update_end(stream):
    """Re-issued ops replace the group's captured ones; they must write to the same outputs."""
    rt = _rt()
    if rt.updating is None:
        raise RuntimeError("graph_task_update_end() without graph_task_update_begin()")
    group, recorder = rt.updating
    recorder.__exit__(None, None, None)
    rt.updating = None
    new = _tasks(recorder.records)
    if [r.func for r in new] != [r.func for r in group.records]:
        raise RuntimeError(f"task update re-issued {[str(r.func) for r in new]} but the group captured "
                           f"{[str(r.func) for r in group.records]}")
    for old, rec in zip(group.records, new):
        outs_old, outs_new = old.kwargs.get("out"), rec.kwargs.get("out")
        same_out = outs_old is not None and outs_new is not None and all(
            a.data_ptr() == b.data_ptr() for a, b in zip(outs_old, outs_new))
        if old.kind == "functional" and not same_out:
            raise RuntimeError(f"{old.func}: a task update must write into the captured outputs "
                               "(use the .out overload with the same out=[...] tensors)")
        old.args, old.kwargs = rec.args, rec.kwargs
    group.graph.events.append(("task_update", {"ops": len(new)}))
    rt.log.append(("task_update_end", stream))


# -- seeds and memory ------------------------------------------------------------------
def manual_seed_all(seed):
    _rt().seed = int(seed)


def mem_get_info(device=None):
    _index(device)
    return _rt().free_memory, _rt().total_memory


def memory_allocated(device=None):
    _index(device)
    return 0


def memory_reserved(device=None):
    _index(device)
    return 0


def max_memory_allocated(device=None):
    _index(device)
    return 0


def empty_cache():
    _rt().log.append(("empty_cache",))


API = {name: globals()[name] for name in SNAPSHOT_APIS}   # every real API the snapshot lists
