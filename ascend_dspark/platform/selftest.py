"""Start-up self-test of a platform: one tiny eager call of every device kernel, and one
tiny graph capture + update + replay, each compared with the plain-torch reference.

Why: a kernel can bind and still be wrong on one SoC / CANN / torch_npu combination, and a
graph can capture and still replay stale values; both would corrupt generation silently.
Tested on tensors of a few KB, a failure costs one switch instead: the op runs its
reference on this platform from then on (`OpRegistry.force_reference`, logged once), and a
failed graph makes the platform run its steps eagerly (`Platform.disable_graphs`). Both show
up in `ascend-dspark doctor` and in the report returned here. `doctor --selftest` runs it;
the engine can call `run_selftest(platform)` before it builds its runner.

The inputs are drawn from a fixed seed on the host, so a report is reproducible; every
kernel and the reference get their own copy (kv_write writes in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ops.context import AttentionHints, ForwardContext
from ops.registry import IMPLS, REFERENCE

from .diagnose import Check
from .interface import Platform

# |kernel - reference| allowed per output dtype (atol = rtol): a fused kernel rounds once where
# the reference rounds two or three times; a wrong kernel is off by O(1).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
HEAD_DIM, KV_HEADS, HEADS = 64, 2, 4


@dataclass(frozen=True)
class Outcome:
    """One test: `name` an op or "graph", `status` "pass", "fail" or "skip"."""

    name: str
    status: str
    detail: str


@dataclass
class SelftestReport:
    platform: str
    ops: list[Outcome] = field(default_factory=list)
    graph: Outcome | None = None

    def switched(self) -> dict[str, str]:
        """op -> why it now runs its reference."""
        return {o.name: o.detail for o in self.ops if o.status == "fail"}

    @property
    def graphs_eager(self) -> str | None:
        """Why graphs now run eagerly, None when they passed or were not tested."""
        return self.graph.detail if self.graph is not None and self.graph.status == "fail" else None

    def checks(self) -> list[Check]:
        status = {"pass": "ok", "fail": "warn", "skip": "info"}
        checks = [Check(f"selftest op {o.name}", status[o.status],
                        o.detail if o.status != "fail" else f"switched to the reference: {o.detail}")
                  for o in self.ops]
        if not self.ops:
            checks.append(Check("selftest ops", "info", f"no device kernels on {self.platform}: nothing to test"))
        if self.graph is not None:
            g = self.graph
            checks.append(Check("selftest graph", status[g.status],
                                g.detail if g.status != "fail" else f"steps run eagerly: {g.detail}"))
        return checks


def run_selftest(platform: Platform) -> SelftestReport:
    """Test `platform`'s kernels and graphs; switch off what fails (see the module docstring)."""
    report = SelftestReport(platform.name)
    registry = platform.ops
    for op in sorted(IMPLS):
        kernel = registry.resolve(op, platform.device)
        backend = registry.chosen()[op]
        if backend == REFERENCE:
            continue
        case = CASES.get(op)
        if case is None:
            report.ops.append(Outcome(op, "skip", f"no self-test case for its {backend} kernel"))
            continue
        why = _check_op(op, kernel, case, platform)
        if why is None:
            report.ops.append(Outcome(op, "pass", f"{backend} kernel matches the reference"))
        else:
            registry.force_reference(op, f"{backend} kernel failed the self-test: {why}")
            report.ops.append(Outcome(op, "fail", f"{backend} kernel: {why}"))
    report.graph = _check_graph(platform)
    return report


# -- ops ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """Host inputs of one tiny call, and what of the call to compare (its return value, or the
    tensors it writes in place)."""

    build: Callable[[torch.Generator, torch.dtype, int], tuple[tuple, dict]]
    outputs: Callable[[object, tuple], object] = lambda returned, args: returned


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _norm(g, dtype, block):
    return (_randn(g, 2, 3, HEAD_DIM, dtype=dtype), 1 + 0.1 * _randn(g, HEAD_DIM, dtype=dtype), 1e-6), {}


def _add_norm(g, dtype, block):
    x, w, eps = _norm(g, dtype, block)[0]
    return (x, _randn(g, 2, 3, HEAD_DIM, dtype=dtype), w, eps), {}


def _swiglu(g, dtype, block):
    return (_randn(g, 2, 3, HEAD_DIM, dtype=dtype), _randn(g, 2, 3, HEAD_DIM, dtype=dtype)), {}


def _rotary(g, dtype, block):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = torch.arange(3).float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), -1)[None]                    # [1, T, D]
    return (_randn(g, 1, 3, KV_HEADS, HEAD_DIM, dtype=dtype), angles.cos().to(dtype), angles.sin().to(dtype)), {}


def _kv_write(g, dtype, block):
    caches = [torch.zeros(2, block, KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2)]
    k, v = (_randn(g, 1, 3, KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2))
    return (*caches, k, v, torch.tensor([[block + 1, 2, block + 5]])), {}


def _attention(g, dtype, block):
    caches = [_randn(g, 3, block, KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2)]
    for cache in caches:
        cache[0] = 0                                                  # the null block
    keys = 2 * block                  # the row's blocks in full (the ops' contract); it reaches into the second
    mask = (torch.arange(keys) < torch.tensor([block + 3, block + 4])[:, None]).view(1, 1, 2, keys)
    q = _randn(g, 1, 2, HEADS, HEAD_DIM, dtype=dtype)
    return (q, *caches, torch.tensor([[1, 2]], dtype=torch.int32), mask, HEAD_DIM ** -0.5), {}


def _top_k_top_p(g, dtype, block):
    logits = _randn(g, 2, HEAD_DIM)            # float32: distinct values, no tie at the k-th
    return ((logits, torch.tensor([0.7, 1.0]), torch.tensor([5, 0]), torch.tensor([0.9, 1.0])),
            {"top_k_bounds": (0, 5)})


CASES: dict[str, Case] = {
    "rms_norm": Case(_norm),
    "add_rms_norm": Case(_add_norm),
    "silu_and_mul": Case(_swiglu),
    "apply_rotary": Case(_rotary),
    "kv_write": Case(_kv_write, outputs=lambda returned, args: (args[0], args[1])),
    "attention": Case(_attention),
    "top_k_top_p": Case(_top_k_top_p),
}


def _on(value, device: torch.device):
    """A private device copy of a tensor argument (others as they are)."""
    return value.to(device, copy=True) if isinstance(value, torch.Tensor) else value


def _check_op(op: str, kernel: Callable, case: Case, platform: Platform) -> str | None:
    """None when `kernel` agrees with the reference on the case's inputs, else why not."""
    args, kwargs = case.build(torch.Generator().manual_seed(0), platform.default_dtype(), platform.kv_block_size)
    results = []
    for fn in (kernel, IMPLS[op][REFERENCE]):
        call_args = tuple(_on(a, platform.device) for a in args)
        try:
            returned = fn(*call_args, **kwargs)
            results.append(case.outputs(returned, call_args))
        except Exception as exc:  # noqa: BLE001  (any failure of a kernel is a finding, not a crash)
            return f"{'raised' if fn is kernel else 'the reference raised'} {type(exc).__name__}: {exc}"
    return _differs(*results)


def _differs(got, want) -> str | None:
    """None when every output of the kernel is within TOLERANCE of the reference's (non-finite
    values, e.g. the -inf of filtered logits, must match exactly), else how it differs."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"returns {a.dtype} {tuple(a.shape)}, the reference {b.dtype} {tuple(b.shape)}"
        tol = TOLERANCE.get(b.dtype, 0.0)
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        finite = b.isfinite()
        if not torch.equal(a.isfinite(), finite) or not torch.equal(a[~finite], b[~finite]):
            return "differs from the reference in its non-finite values"
        error = (a - b).abs()[finite]
        bad = error > tol + tol * b.abs()[finite]
        if bad.any():
            return (f"differs from the reference in {int(bad.sum())} of {b.numel()} values, by up to "
                    f"{float(error.max()):.3g} (allowed: {tol} + {tol} * |reference|)")
    return None


# -- graphs ------------------------------------------------------------------------------------
def _check_graph(platform: Platform) -> Outcome:
    if not platform.supports_graphs:
        return Outcome("graph", "skip", platform.graphs_disabled_reason or f"{platform.name} has no device graphs")
    try:
        why = _graph_roundtrip(platform)
    except Exception as exc:  # noqa: BLE001  (a capture that raises is the finding)
        why = f"{type(exc).__name__}: {exc}"
    if why is None:
        return Outcome("graph", "pass", "capture, length update and replay match the reference")
    platform.disable_graphs(f"the self-test's graph capture + update + replay failed: {why}")
    return Outcome("graph", "fail", why)


def _graph_roundtrip(platform: Platform) -> str | None:
    """Capture rms_norm + attention over a paged cache (the decode step in miniature: the
    fused attention is an updatable task on an NPU), then replay it for three key lengths,
    each time with new data copied into the static inputs and the hints updated."""
    dev, dtype, block = platform.device, platform.default_dtype(), platform.kv_block_size
    g = torch.Generator().manual_seed(1)
    keys = block                                                      # the row's one block
    x = _randn(g, 1, 1, HEADS * HEAD_DIM, dtype=dtype).to(dev)
    w = (1 + 0.1 * _randn(g, HEADS * HEAD_DIM)).to(dtype).to(dev)
    caches = [_randn(g, 2, block, KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2)]
    for cache in caches:
        cache[0] = 0
    k_cache, v_cache = (c.to(dev) for c in caches)
    table = torch.tensor([[1]], dtype=torch.int32, device=dev)
    positions = torch.arange(keys, device=dev)
    mask = (positions < 5).view(1, 1, 1, keys)
    hints = AttentionHints([5], kind="prefix")
    graph = platform.graph(platform.graph_pool())
    ctx = ForwardContext(platform.ops, num_keys=None, hints=hints, graph=graph)
    scale = HEAD_DIM ** -0.5

    def step():
        h = platform.ops.rms_norm(x, w, 1e-6)
        return platform.ops.attention(h.view(1, 1, HEADS, HEAD_DIM), k_cache, v_cache, table, mask, scale, ctx)

    out = graph.capture(step)
    try:
        for n in (5, 11, 2):
            x.copy_(_randn(g, 1, 1, HEADS * HEAD_DIM, dtype=dtype).to(dev))
            mask.copy_((positions < n).view(1, 1, 1, keys))
            hints.update([n])
            graph.replay()
            h = IMPLS["rms_norm"][REFERENCE](x, w, 1e-6)
            want = IMPLS["attention"][REFERENCE](h.view(1, 1, HEADS, HEAD_DIM), k_cache, v_cache, table, mask, scale)
            why = _differs(out, want)
            if why:
                return f"replay with {n} keys {why}"
    finally:
        graph.reset()
    return None
