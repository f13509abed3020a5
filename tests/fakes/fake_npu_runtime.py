"""TEST DOUBLE, not torch_npu: a CPU stand-in for `torch.npu` (torch_npu's `torch_npu/npu/*.py`, newest release).

Why: NpuPlatform, its graph runner and the attention-update path must be exercised in CI
without an NPU. Every public name here has the REAL signature recorded in the contract
snapshot (a test compares them with inspect.signature), so code written against this
double calls the real API the same way.

Work runs eagerly on CPU tensors; streams are tokens. NPUGraph follows the device, not a
callback: capture records every dispatched op (TorchDispatchMode) and EXECUTES NOTHING,
as the device launches nothing while capturing. Tensors an op would create come back
filled with garbage (NaN for floats, the dtype's max for integers, True for bools) with
the shapes of the op's meta kernel; ops that write into existing tensors (in place, out=,
KV-cache scatters) leave them untouched; only views are real. So a captured step's outputs
are garbage until the graph is replayed, and replay re-runs the recorded ops on the
captured tensors. As on the device, replay sees new data only if it was copied into the
captured input tensors, host values (Python ints, seq-length lists) stay baked in, and
`NPUGraph.update()` / `graph_task_update_*` are the only way to change them; re-issued
tasks are recorded, not run.

Rules enforced (RuntimeError unless noted):
- capture on a non-default stream, one capture per graph, TASK_QUEUE_ENABLE != 2;
- no host synchronisation while capturing or updating: torch.npu.synchronize(),
  Stream/Event.synchronize(), .item() / int() / float() / bool() of a tensor,
  .tolist(), .numpy(), nonzero / masked_select (shape from data) — real torch_npu fails
  with ACL error 107027 "stream is captured";
- a graph with task groups replays only after every group was re-issued through
  graph_task_update_begin/end AND the ExternalEvent the group waits on (waited in the
  capture just before graph_task_group_begin) was recorded after that update: the order
  capture -> sequence-length update -> replay, checked at every replay;
- the SoC (`install(soc_version=...)`, default 223 = Ascend910B3, Atlas A2) decides what
  exists: SoCs without bfloat16 (910 first generation, 310P, 310B) reject every op that
  touches a bfloat16 tensor (TypeError), and the fused ops are Atlas A2/A3 only
  (fake_npu_ops);
- no aclop operator while capturing or updating: an aten op that the emulated release runs
  only as an aclop (no aclnn kernel; tests/platform/torch_npu_contracts/acl_op_only/, from
  op-plugin) fails "Cannot run aclop operators during NPU graph capture", as torch_npu does.
  Only ops that reach the dispatch mode are checked: a CompositeImplicitAutograd op that
  torch_npu overrides on the device (`x ^ 3` is `__xor__.Scalar` there) is seen decomposed.

Each NPUGraph keeps `events` (capture_begin, capture_end, update, task_update, replay,
reset, in order); the runtime keeps a global `log` of stream/event/task-group calls.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils._pytree import tree_map

from tools.npu_contract import SNAPSHOT_APIS

DEFAULT_SOC = 223
_SOCS = {   # SocVersion -> (name, has bfloat16, has the fused A2/A3 ops); NpuVariables.h / op-plugin docs
    102: ("Ascend910A", False, False), 103: ("Ascend910ProB", False, False),
    200: ("Ascend310P1", False, False), 202: ("Ascend310P3", False, False),
    220: ("Ascend910B1", True, True), 221: ("Ascend910B2", True, True), 223: ("Ascend910B3", True, True),
    224: ("Ascend910B4", True, True), 240: ("Ascend310B1", False, False),
    250: ("Ascend910_9391", True, True), 252: ("Ascend910_9381", True, True), 255: ("Ascend910_9362", True, True),
    260: ("Ascend950", True, False),
}
DEVICE_NAME = f"{_SOCS[DEFAULT_SOC][0]} (fake_torch_npu test double)"
_CAPTURE_MODES = ("global", "thread_local", "relaxed")
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}
_ALLOC_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty"}  # launch no task
# Ops that NPUGraph.update() can patch (torch_npu/npu/_npugraph_handlers/ifa_handler.py, v1).
_UPDATABLE = {"npu::npu_fused_infer_attention_score"}


class _Runtime:
    """Per-install state; `install()` creates a fresh one."""

    def __init__(self, device_count: int = 1, total_memory: int = 64 << 30, free_memory: int = 60 << 30,
                 soc_version: int = DEFAULT_SOC, aclop_only: frozenset[str] = frozenset()):
        if soc_version not in _SOCS:
            raise ValueError(f"the double knows SoC versions {sorted(_SOCS)}, not {soc_version}")
        self.soc_version = soc_version
        self.soc_name, self.has_bf16, self.has_fused_ops = _SOCS[soc_version]
        self.device_count = device_count
        self.aclop_only = aclop_only   # "aten::name.overload" the release cannot capture
        self.total_memory, self.free_memory = total_memory, free_memory
        self.device = 0
        self.default: dict[int, Stream] = {}
        self.current: dict[int, Stream] = {}
        self.capturing: NPUGraph | None = None
        self.capture_stream: Stream | None = None
        self.open_group: _TaskGroup | None = None
        self.updating: tuple[_TaskGroup, _Recorder] | None = None
        self.pending_event: ExternalEvent | None = None    # waited in the capture, claimed by the next group
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
    if _rt().capturing is not None or _rt().updating is not None:
        raise RuntimeError(f"{what} during NPU graph capture: the host may not wait on a captured stream "
                           "(real torch_npu fails with ACL error 107027 'stream is captured')")


def soc() -> tuple[int, str, bool, bool]:
    """(version, name, has bfloat16, has the fused A2/A3 ops) of the installed double (default SoC
    when none is installed: torch.ops.npu stays registered after uninstall)."""
    if _RT is None:
        return (DEFAULT_SOC, *_SOCS[DEFAULT_SOC])
    return _RT.soc_version, _RT.soc_name, _RT.has_bf16, _RT.has_fused_ops


# -- device ----------------------------------------------------------------------------
def is_available():
    return True


def device_count():
    return _rt().device_count


def get_device_name(device_name=None):
    _index(device_name)
    return f"{_rt().soc_name} (fake_torch_npu test double)"


def get_soc_version():
    """torch_npu/npu/_backends.py: c10_npu::SocVersion as an int (220-225 A2, 250-255 A3 ...)."""
    return _rt().soc_version


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
    """Graph-ordering event (may be waited before it is recorded; reset before reuse).

    Waited inside a capture, it becomes the wait node of the task group begun next; its
    `records` count lets replay check that it was recorded after that group's update."""

    def __init__(self):
        self.records = 0

    def record(self, stream=None):
        self.records += 1
        _rt().log.append(("external_record", self, stream or current_stream()))

    def wait(self, stream=None):
        rt = _rt()
        if rt.capturing is not None:
            rt.pending_event = self
        rt.log.append(("external_wait", self, stream or current_stream()))

    def reset(self, stream=None):
        _rt().log.append(("external_reset", self, stream or current_stream()))


# -- graph recording -------------------------------------------------------------------
@dataclass
class _Record:
    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    out: object
    kind: str  # "functional" (re-run, copy into out) | "mutating" / "out" (re-run) | "view" (skip)
    updatable: bool = False


@dataclass
class _TaskGroup:
    graph: "NPUGraph"
    start: int
    records: list = field(default_factory=list)
    event: "ExternalEvent | None" = None     # the ExternalEvent the group waits on
    updated: bool = False                    # re-issued since the last replay (or capture)
    event_records: int = 0                   # event.records when the group was last updated


def _freeze(value):
    """Host containers are baked at capture (copied); tensors stay by reference (addresses)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _kind(func, kwargs=None) -> str:
    schema = func._schema
    if kwargs and "out" in kwargs and any(a.name == "out" for a in schema.arguments):
        return "out"   # torch_npu's `.out` overloads: `Tensor[] out` carries no alias annotation
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return "mutating"
    if any(r.alias_info is not None for r in schema.returns):
        return "view"
    return "functional"


def _aliases_an_input(out, args, kwargs) -> bool:
    storages = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return all(t.untyped_storage().data_ptr() in storages for t in outs)


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor):
        if dst is not src:
            dst.copy_(src)
    elif isinstance(dst, (list, tuple)) and isinstance(src, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


def _garbage(meta):
    """A real tensor shaped like a meta result, holding what uninitialised device memory would."""
    if not isinstance(meta, torch.Tensor):
        return meta
    out = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)
    if meta.dtype.is_floating_point or meta.dtype.is_complex:
        out.fill_(float("nan"))
    elif meta.dtype == torch.bool:
        out.fill_(True)
    else:
        out.fill_(torch.iinfo(meta.dtype).max)
    return out


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


def _aliased_returns(func, args, kwargs):
    """What an op that writes into its arguments returns, without running it: the arguments
    its schema returns (`Tensor(a!)`), or the `out` list of a torch_npu `.out` overload."""
    schema = func._schema
    if "out" in kwargs and not any(r.alias_info is not None for r in schema.returns):
        return tuple(kwargs["out"])
    bound = {a.name: (args[i] if i < len(args) else kwargs.get(a.name)) for i, a in enumerate(schema.arguments)}
    outs = []
    for ret in schema.returns:
        match = next((bound[a.name] for a in schema.arguments if a.alias_info is not None and ret.alias_info
                      is not None and a.alias_info.before_set == ret.alias_info.before_set), None)
        outs.append(match)
    if not outs:
        return None
    return outs[0] if len(outs) == 1 else tuple(outs)


def _meta_run(func, args, kwargs):
    """The op's result shapes from its meta kernel (npu:: ops: fake_npu_ops' launch-time checks)."""
    try:
        return func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
    except (NotImplementedError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "107027" in str(exc):
            raise
        raise RuntimeError(f"{func._schema.name} cannot be captured in an NPU graph: its output shape is not "
                           f"known without running it ({type(exc).__name__}: {exc})") from exc


_HOST_READS = ("tolist", "numpy")
_INHERITED = object()


class _Recorder(TorchDispatchMode):
    """Records each op with (args, kwargs, outputs) for replay and executes nothing but views."""

    def __init__(self, graph: "NPUGraph | None"):
        super().__init__()
        self.graph = graph
        self.records: list[_Record] = []
        self._saved_reads: dict[str, object] = {}

    def __enter__(self):
        for name in _HOST_READS:       # C++ paths that read tensor memory without dispatching
            self._saved_reads[name] = vars(torch.Tensor).get(name, _INHERITED)

            def refuse(*_a, _name=name, **_k):
                raise RuntimeError(f"Tensor.{_name}() reads device data on the host during NPU graph capture "
                                   "(real torch_npu fails with ACL error 107027 'stream is captured')")
            setattr(torch.Tensor, name, refuse)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved_reads.items():
            if fn is _INHERITED:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, fn)
        self._saved_reads = {}
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in _SYNC_OPS:
            raise RuntimeError(f"{func._schema.name} reads device data on the host during NPU graph capture "
                               "(real torch_npu fails with ACL error 107027 'stream is captured')")
        if func.name() in _rt().aclop_only:
            raise RuntimeError(f"Cannot run aclop operators during NPU graph capture: {func.name()} (the emulated "
                               "torch_npu has no aclnn kernel for it: tests/platform/torch_npu_contracts/acl_op_only/)")
        kind = _kind(func, kwargs)
        if kind == "view":
            out = func(*args, **kwargs)            # a view launches nothing: it only aliases memory
            if not _aliases_an_input(out, args, kwargs):
                # "may alias" ops that copied (`to` with another dtype): a real launch
                kind = "functional"
                out = tree_map(_garbage, _meta_run(func, args, kwargs))
        elif kind == "functional":
            out = tree_map(_garbage, _meta_run(func, args, kwargs))
        else:
            _meta_run(func, args, kwargs)           # the launch-time checks; no write happens
            out = _aliased_returns(func, args, kwargs)
        rec = _Record(func, _freeze(args), _freeze(kwargs), out, kind)
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


class _SocDtypeGuard(TorchDispatchMode):
    """Installed while the double emulates a SoC without bfloat16: any op reading, making or
    returning a bf16 tensor fails."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def bf16(value) -> bool:
            items = value if isinstance(value, (list, tuple)) else (value,)
            return any((isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16) or t is torch.bfloat16
                       for t in items)

        if any(bf16(v) for v in (*args, *kwargs.values())):
            self._refuse(func)
        out = func(*args, **kwargs)
        if bf16(out):
            self._refuse(func)
        return out

    @staticmethod
    def _refuse(func):
        raise TypeError(f"{func._schema.name}: {_rt().soc_name} has no bfloat16 "
                        "(torch_npu: IsBF16Supported() is false before Ascend910B1)")


class NPUGraph:
    def __init__(self):
        self.auto_dispatch_capture = False
        self.events: list[tuple[str, dict]] = []
        self._recorder: _Recorder | None = None
        self._records: list[_Record] | None = None
        self._groups: list[_TaskGroup] = []
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
        rt.pending_event = None
        self._recorder.__enter__()
        self.events.append(("capture_begin", {"pool": pool, "capture_error_mode": capture_error_mode,
                                              "stream": current_stream()}))

    def capture_end(self):
        rt = _rt()
        if rt.capturing is not self:
            raise RuntimeError("capture_end() without a matching capture_begin() on this graph")
        self._recorder.__exit__(None, None, None)
        rt.capturing = None
        rt.pending_event = None
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
        for i, group in enumerate(self._groups):
            if not group.updated:
                raise RuntimeError(f"task group {i} replayed without a sequence-length update since the last "
                                   "replay (capture -> graph_task_update_begin/end -> replay, every step)")
            if group.event is None:
                raise RuntimeError(f"task group {i} waits on no ExternalEvent: the replay could run before its "
                                   "update (event.wait(stream); event.reset(stream) before graph_task_group_begin)")
            if group.event.records <= group.event_records:
                raise RuntimeError(f"task group {i}: its ExternalEvent was not recorded after the update "
                                   "(event.record(update_stream) after graph_task_update_end)")
        _run(self._records)
        for group in self._groups:
            group.updated = False
        self.events.append(("replay", {}))

    def reset(self):
        self._records = None
        self._groups = []
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
            if exc_type is not None:
                _rt().open_group = None    # let the error that ended the capture through
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
    rt.open_group = _TaskGroup(rt.capturing, len(rt.capturing._recorder.records), event=rt.pending_event)
    rt.pending_event = None
    rt.log.append(("task_group_begin", stream))


def graph_task_group_end(stream):
    rt = _rt()
    group = rt.open_group
    if group is None or rt.capturing is not group.graph:
        raise RuntimeError("graph_task_group_end() without graph_task_group_begin() in this capture")
    group.records = _tasks(group.graph._recorder.records[group.start:])
    group.graph._groups.append(group)
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
        same_out = outs_old is not None and outs_new is not None and len(outs_old) == len(outs_new) and all(
            a.data_ptr() == b.data_ptr() for a, b in zip(outs_old, outs_new))
        if old.kind == "functional" or (old.kind == "out" and not same_out):
            raise RuntimeError(f"{old.func}: a task update must write into the captured outputs "
                               "(use the .out overload with the same out=[...] tensors)")
        old.args, old.kwargs = rec.args, rec.kwargs
    group.updated = True
    group.event_records = group.event.records if group.event is not None else 0
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
