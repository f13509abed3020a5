"""ops/backends/npu.py against the reference ops, on the torch_npu TEST DOUBLE.

There is no NPU here: `fake_torch_npu` puts a CPU stand-in behind the REAL torch_npu 2.13.0
op schemas (tests/fakes/), so these tests check what can be checked without hardware:
- every call binds to the real schema (names, keyword-only arguments, required arguments);
- the arguments mean what the op documents: gate first for swiglu, 'half' = rotate_half,
  atten_mask True = masked out, slot_mapping into a paged ND cache ("Norm"), ...;
- the documented A2/A3 dtype / shape limits hold (the double raises on violations), and
  inputs past them run the reference instead (logged once, counted by `fallbacks()`);
- results equal the reference ops on random inputs of real model shapes (SmolLM2-135M,
  Qwen3-8B, Gemma3-1B/4B) and odd sizes.
They cannot check the kernels' own numerics on the device.

Tolerances (fused kernel vs reference op, same inputs, same dtype):
- float32: rtol = atol = 1e-5 (only the float32 arithmetic order differs);
- float16: rtol = atol = 4e-3; bfloat16: rtol = atol = 2e-2 (8-bit significand: the
  reference rounds intermediates to the working dtype one or two more times than a fused
  kernel, so a few bf16 ulps of an O(1) value differ);
- KV writes are copies: bit-exact.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import pytest
import torch

import ops
from ascend_dspark import platform
from ascend_dspark.platform.cpu import CpuPlatform
from ops import registry
from tests.fakes import fake_torch_npu

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
FUSED = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
FLOATS = [pytest.param(torch.float32, id="fp32"), *FUSED]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    offset: float = 0.0   # Gemma norms scale by (1 + w)
    rotary_dim: int | None = None
    window: int | None = None

    @property
    def rot(self) -> int:
        return self.rotary_dim or self.head_dim


SHAPES = [
    Shape("smollm2_135m", hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536),
    Shape("qwen3_8b", hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288),
    Shape("gemma3_1b", hidden=1152, heads=4, kv_heads=1, head_dim=256, intermediate=6912, offset=1.0, window=4),
    Shape("gemma3_4b", hidden=2560, heads=8, kv_heads=4, head_dim=256, intermediate=10240, offset=1.0, window=5),
    # odd sizes: hidden / intermediate not multiples of anything, partial rotary, 6/2 heads of 48
    Shape("odd", hidden=77, heads=6, kv_heads=2, head_dim=48, intermediate=45, rotary_dim=30),
]
SHAPE_PARAMS = [pytest.param(s, id=s.name) for s in SHAPES]


@pytest.fixture
def npu(monkeypatch):
    """The npu backend module, freshly imported against the installed test double.

    Its functions are called directly; the global platform is the CPU one, so the dispatched
    entries the references use internally (add_rms_norm -> rms_norm) stay on the reference.
    """
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(platform, "_current", CpuPlatform())
    with fake_torch_npu.install() as fake:
        registry._reset_for_tests("npu")
        module = importlib.import_module("ops.backends.npu")
        assert module.torch_npu is fake.module and fake.module.__test_double__
        yield module
    assert not {"ops.backends.npu", "ops.backends.npu_sampling"} & set(sys.modules), \
        "uninstalling the double must unload the backend"


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def no_fallback(npu) -> None:
    assert npu.fallbacks() == {}, f"the torch_npu kernel should have run: {npu.fallbacks()}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(shape, generator=gen(seed)) * scale).to(dtype)


# -- norms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_rms_norm(npu, shape, dtype):
    w = randn(shape.hidden, seed=1, scale=0.1) + (0.0 if shape.offset else 1.0)
    for rows in ((2, 7), (3, 1), (1, 13)):
        x = randn(*rows, shape.hidden, dtype=dtype, seed=sum(rows), scale=3.0)
        close(npu.rms_norm(x, w.to(dtype), 1e-6, shape.offset),
              ops.rms_norm.reference(x, w.to(dtype), 1e-6, shape.offset), dtype)
    q = randn(2, 5, shape.heads, shape.head_dim, dtype=dtype, seed=3)  # Qwen3-style per-head q/k norm
    qw = (randn(shape.head_dim, seed=4, scale=0.1) + 1.0).to(dtype)
    close(npu.rms_norm(q, qw, 1e-6), ops.rms_norm.reference(q, qw, 1e-6), dtype)
    no_fallback(npu)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_add_rms_norm(npu, shape, dtype):
    w = (randn(shape.hidden, seed=1, scale=0.1) + (0.0 if shape.offset else 1.0)).to(dtype)
    x = randn(3, 5, shape.hidden, dtype=dtype, seed=2)
    r = randn(3, 5, shape.hidden, dtype=dtype, seed=3, scale=4.0)
    y, summed = npu.add_rms_norm(x, r, w, 1e-5, shape.offset)
    y_ref, summed_ref = ops.add_rms_norm.reference(x, r, w, 1e-5, shape.offset)
    assert torch.equal(summed, summed_ref), "x + residual is one rounding in either path"
    close(y, y_ref, dtype)
    no_fallback(npu)


def test_norm_gamma_is_one_plus_w_for_gemma(npu, monkeypatch):
    """The kernel sees gamma = 1 + w (rounded once to the input dtype) when offset = 1."""
    seen = []
    real = npu.torch_npu.npu_rms_norm
    monkeypatch.setattr(npu.torch_npu, "npu_rms_norm", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    x, w = randn(2, 8, dtype=torch.bfloat16), randn(8, seed=1, scale=0.1)
    npu.rms_norm(x, w, 1e-6, 1.0)
    (args, kwargs), = seen
    assert args[0] is x and torch.equal(args[1], (1.0 + w).to(torch.bfloat16)) and kwargs == {"epsilon": 1e-6}


def test_norm_fallbacks_are_logged_once(npu, caplog):
    x = randn(2, 3, 16, dtype=torch.float64)
    w = torch.ones(16, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="ops"):
        for _ in range(3):
            close(npu.rms_norm(x, w, 1e-6), ops.rms_norm.reference(x, w, 1e-6), torch.float32)
    assert npu.fallbacks() == {("rms_norm", "npu_rms_norm takes float16/bfloat16/float32, not float64"): 3}
    assert sum("rms_norm on the NPU runs the reference" in r.message for r in caplog.records) == 1
    # weight dtype != input dtype: the reference promotes, the kernel cannot -> reference
    xb = randn(2, 16, dtype=torch.bfloat16)
    out = npu.rms_norm(xb, torch.ones(16), 1e-6)
    assert out.dtype == ops.rms_norm.reference(xb, torch.ones(16), 1e-6).dtype == torch.float32
    # residual of another shape (broadcast) -> reference
    y, s = npu.add_rms_norm(xb, randn(1, 16, dtype=torch.bfloat16), torch.ones(16, dtype=torch.bfloat16), 1e-6)
    assert s.shape == (2, 16)
    assert len(npu.fallbacks()) == 3


# -- activation ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_silu_and_mul(npu, shape, dtype):
    gate = randn(2, 5, shape.intermediate, dtype=dtype, seed=1, scale=3.0)
    up = randn(2, 5, shape.intermediate, dtype=dtype, seed=2)
    close(npu.silu_and_mul(gate, up), ops.silu_and_mul.reference(gate, up), dtype)
    # the kernel gates the FIRST half: swapping the operands must change the result
    assert not torch.allclose(npu.silu_and_mul(up, gate).float(), ops.silu_and_mul.reference(gate, up).float())
    no_fallback(npu)


def test_gelu_tanh_and_mul_has_no_npu_kernel(npu):
    assert "npu" not in registry._impls["gelu_tanh_and_mul"]
    for op in ("rms_norm", "add_rms_norm", "silu_and_mul", "apply_rotary", "kv_write", "attention"):
        assert registry._impls[op]["npu"] is getattr(npu, op)
    assert registry._impls["top_k_top_p"]["npu"].__module__ == "ops.backends.npu_sampling"  # loaded along


# -- rotary --------------------------------------------------------------------------------
def cos_sin(positions: torch.Tensor, rot: int, dtype: torch.dtype):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    return ops.rotary_cos_sin(inv_freq, positions, 1.0, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_apply_rotary(npu, shape, dtype):
    positions = torch.tensor([[0, 1, 2, 3, 4], [17, 18, 19, 20, 21], [5, 6, 7, 0, 0]])  # ragged + padding
    cos, sin = cos_sin(positions, shape.rot, dtype)
    for heads in (shape.heads, shape.kv_heads):
        x = randn(3, 5, heads, shape.head_dim, dtype=dtype, seed=heads)
        out = npu.apply_rotary(x, cos, sin)
        close(out, ops.apply_rotary.reference(x, cos, sin), dtype)
        if shape.rot < shape.head_dim:
            assert torch.equal(out[..., shape.rot:], x[..., shape.rot:]), "the unrotated tail passes through"
    no_fallback(npu)


def test_rotary_calls_the_kernel_in_half_mode_with_bs1d_cos(npu, monkeypatch):
    seen = []
    real = npu.torch_npu.npu_rotary_mul
    monkeypatch.setattr(npu.torch_npu, "npu_rotary_mul", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    x = randn(2, 3, 4, 64, dtype=torch.bfloat16)
    cos, sin = cos_sin(torch.arange(3).expand(2, 3), 32, torch.bfloat16)
    npu.apply_rotary(x, cos, sin)
    (args, kwargs), = seen
    assert kwargs == {"rotary_mode": "half"} and len(args) == 3
    assert args[0].shape == (2, 3, 4, 32) and args[0].is_contiguous()       # the rotated head of each vector
    assert args[1].shape == args[2].shape == (2, 3, 1, 32)                  # BS1D for a BSND input


def test_rotary_fallbacks(npu):
    x = randn(2, 3, 4, 64, dtype=torch.bfloat16)
    cos, sin = cos_sin(torch.arange(3).expand(2, 3), 64, torch.float32)     # cos/sin dtype != x dtype
    assert torch.equal(npu.apply_rotary(x, cos, sin), ops.apply_rotary.reference(x, cos, sin))
    wide = randn(1, 3, 1000, 16, dtype=torch.bfloat16)                       # N >= 1000
    cos, sin = cos_sin(torch.arange(3).expand(1, 3), 16, torch.bfloat16)
    assert torch.equal(npu.apply_rotary(wide, cos, sin), ops.apply_rotary.reference(wide, cos, sin))
    assert [op for op, _ in npu.fallbacks()] == ["apply_rotary", "apply_rotary"]


# -- KV write ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FUSED)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_kv_write_touches_only_its_rows(npu, shape, dtype, monkeypatch):
    num_slots, capacity = 5, 11
    nan_cache = torch.full((num_slots, capacity + 1, shape.kv_heads, shape.head_dim), float("nan"), dtype=dtype)
    k_cache, v_cache = nan_cache.clone(), nan_cache.clone()
    k = randn(3, 4, shape.kv_heads, shape.head_dim, dtype=dtype, seed=1)
    v = randn(3, 4, shape.kv_heads, shape.head_dim, dtype=dtype, seed=2)
    slot_ids = torch.tensor([3, 0, 4])                      # slots 1 and 2 are not in the batch
    positions = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10], [5, 0, 0, 0]])
    valid = torch.tensor([[True] * 4, [True, True, True, False], [True, False, False, False]])
    seen = []
    real = npu.torch_npu.npu_scatter_pa_kv_cache
    monkeypatch.setattr(npu.torch_npu, "npu_scatter_pa_kv_cache",
                        lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))

    assert npu.kv_write(k_cache, v_cache, k, v, slot_ids, positions, valid) is None

    (args, kwargs), = seen
    assert kwargs == {"cache_mode": "Norm"} and args[2] is k_cache and args[3] is v_cache  # written in place
    slot_mapping = args[4]
    assert slot_mapping.dtype == torch.int32 and slot_mapping.shape == (12,)
    block = capacity + 1
    scratch = [s * block + capacity for s in (0, 4)]
    assert slot_mapping.tolist() == [3 * block + p for p in (0, 1, 2, 3)] + [7, 8, 9, scratch[0]] + \
        [4 * block + 5] + [scratch[1]] * 3, "padding goes to its slot's scratch row, never -1"

    written = torch.zeros(num_slots, capacity + 1, dtype=torch.bool)
    for b, slot in enumerate(slot_ids.tolist()):
        for t in range(4):
            if valid[b, t]:
                p = int(positions[b, t])
                written[slot, p] = True
                assert torch.equal(k_cache[slot, p], k[b, t]) and torch.equal(v_cache[slot, p], v[b, t])
    written[[0, 4], capacity] = True                                       # the scratch rows of padded slots
    for cache in (k_cache, v_cache):
        assert cache[~written].isnan().all(), "rows nobody wrote must stay untouched"
        assert not cache[written].isnan().any()
    assert k_cache[1:3].isnan().all() and k_cache[3, capacity].isnan().all()

    ref_k, ref_v = nan_cache.clone(), nan_cache.clone()
    ops.kv_write.reference(ref_k, ref_v, k, v, slot_ids, positions, valid)
    real_rows = torch.ones(capacity + 1, dtype=torch.bool)
    real_rows[capacity] = False                                           # duplicate scratch writes may differ
    torch.testing.assert_close(k_cache[:, real_rows], ref_k[:, real_rows], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache[:, real_rows], ref_v[:, real_rows], rtol=0, atol=0, equal_nan=True)
    no_fallback(npu)


def test_kv_write_float32_runs_the_reference(npu):
    """A2/A3's scatter kernel has no float32 (only fp16/bf16/int8): the reference writes instead."""
    k_cache, v_cache = torch.full((2, 5, 1, 16), float("nan")), torch.full((2, 5, 1, 16), float("nan"))
    k, v = randn(1, 2, 1, 16), randn(1, 2, 1, 16, seed=1)
    npu.kv_write(k_cache, v_cache, k, v, torch.tensor([1]), torch.tensor([[2, 3]]), torch.tensor([[True, True]]))
    assert torch.equal(k_cache[1, 2:4], k[0]) and k_cache[0].isnan().all()
    assert list(npu.fallbacks()) == [("kv_write", "npu_scatter_pa_kv_cache takes float16/bfloat16, not float32")]


# -- attention -----------------------------------------------------------------------------
def attention_case(shape: Shape, kind: str, dtype: torch.dtype):
    """q, caches, slot ids, mask and scale for one engine situation; stale data is large and finite."""
    num_slots, capacity, batch = 4, 24, 3
    slot_ids = torch.tensor([2, 0, 3])
    lengths = torch.tensor([5, 13, 9])                       # tokens already cached per request
    if kind == "prefill":                                    # ragged prompts, right-padded
        t = 7
        positions = torch.arange(t).expand(batch, t)
        kv_limit = positions + 1
    elif kind == "decode":
        t = 1
        positions = lengths.unsqueeze(1)
        kv_limit = positions + 1
    elif kind == "verify":                                   # [anchor, d1..dK], causal
        t = 4
        positions = lengths.unsqueeze(1) + torch.arange(t)
        kv_limit = positions + 1
    elif kind == "block":                                    # DFlash/DSpark block: bidirectional inside
        t = 4
        positions = lengths.unsqueeze(1) + torch.arange(t)
        kv_limit = (lengths + t).unsqueeze(1).expand(batch, t)
    else:
        raise ValueError(kind)
    num_keys = int(kv_limit.max()) if kind != "block" else capacity
    window = shape.window if kind in ("prefill", "verify") else None
    mask = ops.build_attention_mask(positions, kv_limit, num_keys, window)
    k_cache = randn(num_slots, capacity + 1, shape.kv_heads, shape.head_dim, dtype=dtype, seed=1)
    v_cache = randn(num_slots, capacity + 1, shape.kv_heads, shape.head_dim, dtype=dtype, seed=2)
    stale = torch.arange(capacity + 1)[None, :] >= (lengths + t)[:, None]        # never written / rolled back
    for b, slot in enumerate(slot_ids.tolist()):
        k_cache[slot, stale[b]] = 1e3
        v_cache[slot, stale[b]] = -1e3
    k_cache[1] = v_cache[1] = 5e2                                                  # a slot nobody reads
    q = randn(batch, t, shape.heads, shape.head_dim, dtype=dtype, seed=3)
    return q, k_cache, v_cache, slot_ids, mask, shape.head_dim ** -0.5


KINDS = ["prefill", "decode", "verify", "block"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FUSED)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_attention(npu, shape, dtype, kind):
    args = attention_case(shape, kind, dtype)
    out = npu.attention(*args)
    ref = ops.attention.reference(*args)
    close(out, ref, dtype)
    assert out.abs().max() < 50, "stale cache rows (|v| = 1000) must stay masked"
    no_fallback(npu)


def test_attention_passes_the_documented_arguments(npu, monkeypatch):
    seen = []
    real = npu.torch_npu.npu_fused_infer_attention_score
    monkeypatch.setattr(npu.torch_npu, "npu_fused_infer_attention_score",
                        lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    q, k_cache, v_cache, slot_ids, mask, scale = attention_case(SHAPES[0], "verify", torch.bfloat16)
    npu.attention(q, k_cache, v_cache, slot_ids, mask, scale)
    (args, kwargs), = seen
    query, key, value = args
    assert query.shape == (3, 4, 9, 64) and key.shape == value.shape == (3, mask.shape[-1], 3, 64)
    assert torch.equal(key, k_cache[slot_ids, : mask.shape[-1]]) and key.is_contiguous()
    assert torch.equal(kwargs.pop("atten_mask"), ~mask), "torch_npu masks OUT where True"
    assert kwargs == dict(num_heads=9, num_key_value_heads=3, scale=scale, input_layout="BSND", sparse_mode=0,
                          inner_precise=0)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_attention_float32_and_odd_head_dims_run_the_reference(npu, kind):
    """FIA takes fp16/bf16 queries only and D % 16 == 0: float32, or D = 40, run the reference."""
    q, k_cache, v_cache, slot_ids, mask, scale = attention_case(SHAPES[0], kind, torch.float32)
    assert torch.equal(npu.attention(q, k_cache, v_cache, slot_ids, mask, scale),
                       ops.attention.reference(q, k_cache, v_cache, slot_ids, mask, scale))
    odd = Shape("d40", hidden=80, heads=2, kv_heads=1, head_dim=40, intermediate=8)
    args = attention_case(odd, kind, torch.bfloat16)
    assert torch.equal(npu.attention(*args), ops.attention.reference(*args))
    assert sorted(npu.fallbacks()) == [
        ("attention", "npu_fused_infer_attention_score needs D <= 512 and a multiple of 16 for fp16/bf16, got 40"),
        ("attention", "npu_fused_infer_attention_score takes float16/bfloat16, not float32"),
    ]


def test_the_double_would_reject_what_the_backend_avoids(npu):
    """The guards are not decoration: the hardware limits they avoid are enforced by the double."""
    q, k_cache, v_cache, slot_ids, mask, scale = attention_case(SHAPES[0], "prefill", torch.float32)
    key = k_cache[:, : mask.shape[-1]].index_select(0, slot_ids)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        npu.torch_npu.npu_fused_infer_attention_score(q, key, key, num_heads=9, num_key_value_heads=3,
                                                      input_layout="BSND")
    with pytest.raises(TypeError, match="float16/bfloat16/int8"):
        npu.torch_npu.npu_scatter_pa_kv_cache(key[0], key[0], k_cache, v_cache,
                                              torch.zeros(key.shape[1], dtype=torch.int32), cache_mode="Norm")
    with pytest.raises(TypeError, match="gamma dtype"):
        npu.torch_npu.npu_rms_norm(q.bfloat16(), torch.ones(64), epsilon=1e-6)
