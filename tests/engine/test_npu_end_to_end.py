"""The whole engine on the NPU platform, with torch_npu replaced by its TEST DOUBLE.

`fake_torch_npu` (tests/fakes/) puts CPU kernels behind the real torch_npu op schemas (of
the newest supported release) and emulates `torch.npu` (streams, NPUGraph);
`patch_npu_platform` keeps the NpuPlatform's tensors on the CPU. So
`set_platform(NpuPlatform())` routes every op through `ops.registry` to
ops/backends/npu.py and on into the double, as it would into CANN on an
Ascend host. What this checks: the platform really selects the "npu" backend, the
kernels' wiring (slot mapping, paged attention through the block tables, masks, layouts,
GQA) is right inside a full speculative generate loop (prefill, DSpark drafting with
block-bidirectional masks, verification, rollback) with both the paged and the gathered
attention forms; a SoC without the fused kernels (910A) generates on the reference ops in
float16; and NPU graph capture (which executes nothing in the double, as on the device) /
length update / replay re-runs the recorded torch_npu tasks.
What it cannot check: device numerics, speed, CANN itself.

Token-exact comparisons run in float32: in bf16 a fused kernel rounds once where the
reference rounds two or three times, and on a tiny random model such last-bit differences
flip near-tied argmaxes within a few tokens (as they would on real hardware). float32 is
also a real NPU configuration: the norm / activation / rotary kernels run, attention and
the KV write run the reference by design (A2/A3 FIA and scatter have no float32). A second
float32 run widens those two dtype lists and relaxes the double's limits (a test-only
device) so that every kernel sits in the token-exact loop; bf16 runs every kernel with the
real limits and is compared with tolerances.
"""

from __future__ import annotations

import copy
import functools
import importlib
import sys

import pytest
import torch

import ops
from ascend_dspark import platform
from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.platform.cpu import CpuPlatform
from ascend_dspark.spec.sampling import SamplingParams
from ops import registry
from tests.fakes import fake_torch_npu
from tests.helpers import new_cache, run_batch, tiny_target

PROMPTS = [[5, 17, 3, 44, 9, 1, 30], [9, 1, 44]]          # a ragged batch of 2
K = 3
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
OUR_OPS = ("rms_norm", "apply_rotary", "kv_write", "attention", "silu_and_mul")     # always in the loop
FUSED_OPS = (*OUR_OPS, "add_rms_norm")                     # every op with an "npu" kernel in ops/backends/npu.py
KERNELS = ("npu_rms_norm", "npu_rotary_mul", "npu_scatter_pa_kv_cache", "npu_fused_infer_attention_score",
           "npu_swiglu")
COUNTED = (*KERNELS, "npu_add_rms_norm", "npu_top_k_top_p")


def _engine(target, drafter, kv_block_size: int = 16, speculation: str | None = None) -> Engine:
    return Engine(target, drafter, num_speculative_tokens=K, max_model_len=64, max_batch_size=2,
                  kv_block_size=kv_block_size, speculation=speculation)


@functools.cache
def _models(arch: str, dtype: torch.dtype):
    torch.manual_seed(0)
    target, _ = tiny_target(arch, dtype=dtype)
    torch.manual_seed(1)
    return target, create_drafter("dspark", target).to(dtype)


@pytest.fixture(scope="module", autouse=True)
def _build_models_before_the_double():
    """transformers imports accelerate lazily, which probes `torch_npu` with find_spec: build the
    models (and so import them) while the real environment, not the double, is in sys.modules.
    One intra-op thread: these models are tiny, and extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for arch in ("llama", "qwen3"):
        for dtype in (torch.float32, torch.bfloat16):
            _models(arch, dtype)
    yield
    torch.set_num_threads(threads)


def reference_tokens(monkeypatch, target, drafter) -> list[list[int]]:
    """The same generate on the CPU platform with every op forced to the reference."""
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    platform.set_platform(CpuPlatform())
    try:
        return [o.token_ids for o in _engine(target, drafter).generate(PROMPTS, GREEDY)]
    finally:
        monkeypatch.delenv(registry.ENV_VAR)


@pytest.fixture
def npu(monkeypatch):
    """NpuPlatform on the double, as the global platform; everything global restored after."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.delenv(platform.ENV_VAR, raising=False)
    monkeypatch.setattr(platform, "_current", platform._current)     # restored at teardown
    fake_torch_npu.patch_npu_platform(monkeypatch)
    with fake_torch_npu.install() as fake:
        fake_torch_npu.unload_backend("npu")
        from ascend_dspark.platform.npu import NpuPlatform

        fake.platform = NpuPlatform()
        fake.calls = {}
        yield fake
    fake_torch_npu.unload_backend("npu")
    assert "ops.backends.npu" not in sys.modules


def use_npu(fake, monkeypatch):
    """Make the NPU platform current, count kernel calls; return the (imported) backend module."""
    fake_torch_npu.unload_backend("npu")                       # forget the reference run's choices
    platform.set_platform(fake.platform)
    backend = importlib.import_module("ops.backends.npu")
    for name in COUNTED:
        real = getattr(fake.module, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            fake.calls[_name] = fake.calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        if hasattr(real, "out"):                          # the graph-capture overload stays reachable
            counted.out = real.out
        monkeypatch.setattr(fake.module, name, counted)
    return backend


def use_npu_in_float32(fake, monkeypatch):
    """`use_npu`, with float32 admitted by FIA / scatter and the double's A2/A3 limits relaxed
    (test-only), so every kernel runs inside a token-exact float32 loop."""
    backend = use_npu(fake, monkeypatch)
    attention = importlib.import_module("ops.backends.npu_attention")
    monkeypatch.setattr(attention, "ATTENTION_DTYPES", (*attention.ATTENTION_DTYPES, torch.float32))
    monkeypatch.setattr(backend, "KV_CACHE_DTYPES", (*backend.KV_CACHE_DTYPES, torch.float32))
    fake_torch_npu.set_enforce_hw_constraints(monkeypatch, False)
    return backend


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_speculative_generate_on_npu_equals_reference(npu, monkeypatch, arch):
    target, drafter = _models(arch, torch.float32)
    expected = reference_tokens(monkeypatch, target, drafter)
    backend = use_npu(npu, monkeypatch)

    outputs = _engine(target, drafter).generate(PROMPTS, GREEDY)

    assert [o.token_ids for o in outputs] == expected
    assert [len(o.token_ids) for o in outputs] == [GREEDY.max_tokens] * 2
    chosen = npu.platform.ops.chosen()
    assert {op: chosen.get(op) for op in OUR_OPS} == dict.fromkeys(OUR_OPS, "npu")
    assert all(chosen[op] == "npu" for op in FUSED_OPS if op in chosen), chosen
    assert all(npu.calls.get(k, 0) > 0 for k in ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu")), npu.calls
    # float32 attention / KV writes are the documented reference fallback on A2/A3
    assert {op for op, _ in backend.fallbacks()} == {"attention", "kv_write"}
    assert "npu_fused_infer_attention_score" not in npu.calls and "npu_scatter_pa_kv_cache" not in npu.calls


@pytest.mark.parametrize("block_size, modes", [(128, {"paged"}), (16, {"gathered"})])
def test_every_kernel_inside_the_token_exact_loop(npu, monkeypatch, block_size, modes):
    """Test-only: float32 admitted by FIA / scatter (and the double's A2/A3 limits relaxed),
    so the attention and KV-write wiring also has to reproduce the reference tokens exactly.
    kv_block_size 128 (NpuPlatform.kv_block_size) pages every attention through the block
    table; 16 is too small for FIA's paged form with several queries per row (prefill,
    verification, block drafting), so those gather K/V out of the blocks first."""
    target, drafter = _models("qwen3", torch.float32)
    expected = reference_tokens(monkeypatch, target, drafter)
    backend = use_npu_in_float32(npu, monkeypatch)

    # fixed K: every verify step has K + 1 queries per row (a depth-0 step of the confidence
    # policy has one, which pages even at block size 16)
    outputs = _engine(target, drafter, kv_block_size=block_size, speculation="fixed").generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert backend.fallbacks() == {}
    assert set(KERNELS) <= set(npu.calls), npu.calls
    assert set(backend.attention_modes()) == modes, backend.attention_modes()


def test_910a_generates_the_reference_tokens_without_torch_npu_kernels(monkeypatch):
    """An Ascend 910A (no bf16, none of the fused kernels): NpuPlatform picks float16 and the
    reference ops, so a full speculative generate touches no torch_npu kernel (the double
    would raise on any, and on any bfloat16 tensor) and gives the reference tokens."""
    target, drafter = _models("llama", torch.float32)
    expected = reference_tokens(monkeypatch, target, drafter)
    monkeypatch.delenv(platform.ENV_VAR, raising=False)
    monkeypatch.setattr(platform, "_current", platform._current)
    fake_torch_npu.patch_npu_platform(monkeypatch)
    with fake_torch_npu.install(soc_version=102):
        fake_torch_npu.unload_backend("npu")
        from ascend_dspark.platform.npu import NpuPlatform

        npu_platform = platform.set_platform(NpuPlatform())
        assert npu_platform.default_dtype() == torch.float16 and npu_platform.op_backend == "reference"
        outputs = _engine(target, drafter).generate(PROMPTS, GREEDY)
        assert set(npu_platform.ops.chosen().values()) == {"reference"}
    fake_torch_npu.unload_backend("npu")
    assert [o.token_ids for o in outputs] == expected


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_runs_every_kernel_and_is_as_accurate_as_the_reference(npu, monkeypatch, arch, caplog):
    """bf16 with the real limits: the full speculative loop runs on the kernels only (no
    fallback), and on the generated sequence the target's logits are as close to exact
    arithmetic (the same bf16 weights in float64) as the bf16 reference path's are. The
    two bf16 paths differ from each other by rounding amplified through the random layers
    (~10% of the logit range here), so they are not compared token for token."""
    from ascend_dspark.engine import runner

    target, drafter = _models(arch, torch.bfloat16)
    backend = use_npu(npu, monkeypatch)
    runner._warn_not_exact.cache_clear()
    with caplog.at_level("WARNING", logger=runner.logger.name):
        outputs = _engine(target, drafter).generate(PROMPTS, GREEDY)
    # No batch-invariant matmul on the NPU: the engine says half precision is not exact there.
    assert "not batch-invariant" in caplog.text and "npu" in caplog.text.lower()
    assert [len(o.token_ids) for o in outputs] == [GREEDY.max_tokens] * 2
    assert backend.fallbacks() == {}
    assert set(KERNELS) <= set(npu.calls), npu.calls

    # teacher-forced: one ragged forward over prompt + generated tokens
    rows = [p + o.token_ids for p, o in zip(PROMPTS, outputs)]
    npu_logits, _, valid = run_batch(target, new_cache(target, 2, 64), rows, [0, 0], registry=npu.platform.ops)
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    ref_logits, _, _ = run_batch(target, new_cache(target, 2, 64), rows, [0, 0])
    exact = copy.deepcopy(target).to(torch.float64)
    exact_logits, _, _ = run_batch(exact, new_cache(exact, 2, 64), rows, [0, 0])
    err_npu = (npu_logits[valid] - exact_logits[valid]).abs()
    err_ref = (ref_logits[valid] - exact_logits[valid]).abs()
    assert err_npu.mean() <= 1.25 * err_ref.mean(), (err_npu.mean(), err_ref.mean())
    assert err_npu.max() <= 1.5 * err_ref.max(), (err_npu.max(), err_ref.max())


def test_ops_resolve_to_npu_only_on_the_platform_device(npu, monkeypatch):
    use_npu(npu, monkeypatch)
    reg = npu.platform.ops
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    reg.rms_norm(x, w, 1e-6)
    reg.gelu_tanh_and_mul(x, x)
    assert reg.chosen()["rms_norm"] == "npu" and reg.chosen()["gelu_tanh_and_mul"] == "reference"
    assert reg.resolve("rms_norm", torch.device("meta")) is ops.rms_norm.reference  # not the NPU device
    assert ops.rms_norm(x, w, 1e-6) is not None and registry.DEVICE_DEFAULTS.chosen()["rms_norm"] == "reference"
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert reg.resolve("rms_norm", torch.device("cpu")) is ops.rms_norm.reference


def test_graph_capture_and_replay_rerun_the_npu_kernels(npu, monkeypatch):
    """One attention block on the paged cache captured through NpuPlatform.graph(), with the
    host lengths as AttentionHints: capture executes nothing (the double returns garbage),
    capture() replays once, and each later replay first re-issues the fused attention with
    the hints' current lengths (graph task update), then re-runs the recorded torch_npu tasks
    on the captured buffers (new data copied in) -- equal to the same step run eagerly."""
    from ops.context import AttentionHints, ForwardContext

    backend = use_npu(npu, monkeypatch)
    heads, kv_heads, dim, hidden, block = 4, 2, 64, 96, 128
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16

    def rand(*shape):
        return torch.randn(shape, generator=g).to(dt)

    # static buffers: inputs are copied in before each replay, never rebound
    x, q_in = rand(2, 3, hidden), rand(2, 3, heads, dim)
    k_in, v_in = rand(2, 3, kv_heads, dim), rand(2, 3, kv_heads, dim)
    k_cache = torch.zeros(4, block, kv_heads, dim, dtype=dt)       # blocks 0, 1 owned, 2 null, 3 scratch
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([[1], [0]], dtype=torch.int32)
    positions = torch.tensor([[4, 5, 6], [0, 1, 2]])
    slot_mapping = torch.tensor([[block + 4, block + 5, block + 6], [0, 1, 3 * block]])  # last: padding -> scratch
    mask = ops.build_attention_mask(positions, positions + 1, block)
    hints = AttentionHints([7, 2], [3, 2], kind="causal")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    cos, sin = ops.rotary_cos_sin(inv_freq, positions, 1.0, dt)
    norm_w = torch.ones(hidden, dtype=dt)

    graph = npu.platform.graph()
    reg = npu.platform.ops
    ctx = ForwardContext(reg, hints=hints, graph=graph)

    def step():
        h = reg.rms_norm(x, norm_w, 1e-6)
        q, k = reg.apply_rotary(q_in, cos, sin), reg.apply_rotary(k_in, cos, sin)
        reg.kv_write(k_cache, v_cache, k, v_in, slot_mapping)
        attn = reg.attention(q, k_cache, v_cache, table, mask, dim ** -0.5, ctx)
        return h, reg.silu_and_mul(attn, attn)

    captured = graph.capture(step)
    assert all(t.isfinite().all() for t in captured), "capture() must replay: captured outputs start as garbage"
    recorded = {str(r.func) for r in graph._graph._records}
    assert {f"npu.{k}.default" for k in KERNELS if k != "npu_fused_infer_attention_score"} <= recorded
    assert "npu.npu_fused_infer_attention_score.out" in recorded
    assert backend.attention_modes() == {"paged": 3}                 # 2 warmups + the capture

    calls_before = dict(npu.calls)
    first = [t.clone() for t in captured]
    for buf in (x, q_in, k_in, v_in):
        buf.copy_(rand(*buf.shape))
    hints.update([6, 2], [2, 2])                                     # row 0 keeps only 2 of its 3 queries
    graph.replay()
    assert npu.calls == calls_before, "replay re-issues recorded tasks; it does not call Python again"
    assert not torch.equal(captured[1], first[1])

    replayed = [t.clone() for t in captured]
    eager = step()                                                   # same buffers, same kernels, eagerly
    assert torch.equal(replayed[0], eager[0])
    valid = torch.tensor([[True, True, False], [True, True, False]])
    assert torch.equal(replayed[1][valid], eager[1][valid])          # padding queries are don't-care
    assert [e[0] for e in graph._graph.events] == ["capture_begin", "capture_end", "task_update", "replay",
                                                   "task_update", "replay"]


def test_whole_step_npu_graphs_give_the_reference_tokens(npu, monkeypatch):
    """The engine's graph runner on the NPU platform (through the double, which computes
    nothing while capturing and checks capture -> length update -> replay): bucketed verify
    steps replayed from NPU graphs give the eager reference tokens."""
    target, drafter = _models("qwen3", torch.float32)
    expected = reference_tokens(monkeypatch, target, drafter)
    backend = use_npu_in_float32(npu, monkeypatch)
    engine = Engine(target, drafter, num_speculative_tokens=K, max_model_len=64, max_batch_size=2,
                    kv_block_size=128, graphs=True)
    assert engine.runner.graph_runner is not None
    outputs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == expected
