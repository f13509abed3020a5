"""ops/backends/npu.py against the reference ops, on the torch_npu TEST DOUBLE.

There is no NPU here: `fake_torch_npu` puts a CPU stand-in behind the REAL torch_npu op
schemas of the newest supported release (tests/fakes/; the older releases' differences:
tests/platform/test_npu_matrix.py), so these tests check what can be checked without hardware:
- every call binds to the real schema (names, keyword-only arguments, required arguments);
- the arguments mean what the op documents: gate first for swiglu, 'half' = rotate_half,
  atten_mask True = masked out, slot_mapping into a paged ND cache ("Norm"), FIA's page
  attention (block_table, block_size, (blocknum, block_size, H) caches, mandatory
  actual_seq_lengths_kv), sparse_mode=3 with the compressed causal mask when the caller's
  AttentionHints promise causal masks, ...;
- inside an NPU graph, attention is an updatable task: the platform graph re-issues it with
  the hints' new lengths before every replay (the double refuses a replay without);
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
from ops.context import AttentionHints, ForwardContext
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
        fake_torch_npu.unload_backend("npu")
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


def test_one_dimensional_norm_inputs_run_the_kernel_as_one_row(npu):
    """The kernels refuse 1-D inputs (the double too): a 1-D vector runs as one row."""
    w = (randn(16, seed=1, scale=0.1) + 1.0).to(torch.bfloat16)
    x, r = randn(16, dtype=torch.bfloat16, seed=2), randn(16, dtype=torch.bfloat16, seed=3)
    with pytest.raises(Exception, match="at least 2 dims"):
        npu.torch_npu.npu_rms_norm(x, w, epsilon=1e-6)
    close(npu.rms_norm(x, w, 1e-6), ops.rms_norm.reference(x, w, 1e-6), torch.bfloat16)
    y, summed = npu.add_rms_norm(x, r, w, 1e-6)
    assert y.shape == summed.shape == (16,) and torch.equal(summed, x + r)
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
    assert "npu" not in registry.IMPLS["gelu_tanh_and_mul"]
    for op in ("rms_norm", "add_rms_norm", "silu_and_mul", "apply_rotary", "kv_write", "attention"):
        assert registry.IMPLS[op]["npu"] is getattr(npu, op)
    assert registry.IMPLS["top_k_top_p"]["npu"].__module__ == "ops.backends.npu_sampling"  # loaded along


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


# -- paged KV cache ------------------------------------------------------------------------
@dataclass
class Paged:
    """A paged cache as the engine lays it out (ascend_dspark/cache/): allocatable
    blocks 0..N-1 handed out in scrambled order, the never-written null block N (zeros) that
    table entries past a request's blocks point at, then scratch rows for padding tokens."""

    k: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor          # [num_seqs, max_blocks] int32
    block_size: int
    null_block: int
    scratch_base: int

    def rows(self, slots, positions) -> torch.Tensor:
        block = self.table[slots.unsqueeze(1).expand_as(positions), positions // self.block_size].long()
        return block * self.block_size + positions % self.block_size


def paged_cache(kv_heads: int, dim: int, dtype, num_seqs=4, max_blocks=2, block_size=128, fill=float("nan"),
                seed=0) -> Paged:
    num_blocks = num_seqs * max_blocks + 1                       # one block nobody owns
    scratch_blocks = 1
    physical = num_blocks + 1 + scratch_blocks
    order = torch.randperm(num_blocks, generator=gen(seed))[: num_seqs * max_blocks]
    table = order.view(num_seqs, max_blocks).int()
    k = torch.full((physical, block_size, kv_heads, dim), fill, dtype=dtype)
    v = torch.full((physical, block_size, kv_heads, dim), fill, dtype=dtype)
    k[num_blocks] = 0                                            # the null block
    v[num_blocks] = 0
    return Paged(k, v, table, block_size, num_blocks, (num_blocks + 1) * block_size)


def spy(npu, monkeypatch, name: str) -> list:
    seen = []
    real = getattr(npu.torch_npu, name)
    monkeypatch.setattr(npu.torch_npu, name, lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))
    return seen


# -- KV write ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FUSED)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_kv_write_touches_only_its_rows(npu, shape, dtype, monkeypatch):
    cache = paged_cache(shape.kv_heads, shape.head_dim, dtype, block_size=16)
    k = randn(3, 4, shape.kv_heads, shape.head_dim, dtype=dtype, seed=1)
    v = randn(3, 4, shape.kv_heads, shape.head_dim, dtype=dtype, seed=2)
    slots = torch.tensor([3, 0, 2])
    positions = torch.tensor([[0, 1, 2, 3], [14, 15, 16, 17], [5, 0, 0, 0]])   # row 1 crosses a block
    valid = torch.tensor([[True] * 4, [True, True, True, False], [True, False, False, False]])
    slot_mapping = torch.where(valid, cache.rows(slots, positions),
                               cache.scratch_base + torch.arange(12).view(3, 4))  # distinct scratch rows
    seen = spy(npu, monkeypatch, "npu_scatter_pa_kv_cache")
    k_cache, v_cache = cache.k.clone(), cache.v.clone()

    assert npu.kv_write(k_cache, v_cache, k, v, slot_mapping) is None

    (args, kwargs), = seen
    assert kwargs == {"cache_mode": "Norm"} and args[2] is k_cache and args[3] is v_cache  # written in place
    assert args[4].dtype == torch.int32 and args[4].shape == (12,)
    assert torch.equal(args[4], slot_mapping.flatten().int())
    assert args[0].shape == (12, shape.kv_heads, shape.head_dim) and args[0].is_contiguous()
    flat_k, flat_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    for b in range(3):
        for t in range(4):
            row = int(slot_mapping[b, t])
            assert torch.equal(flat_k[row], k[b, t]) and torch.equal(flat_v[row], v[b, t])
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    written[slot_mapping.flatten()] = True
    written[cache.null_block * 16:(cache.null_block + 1) * 16] = True          # zeros, not NaN
    for flat in (flat_k, flat_v):
        assert flat[~written].isnan().all(), "rows nobody wrote must stay untouched"
    ref_k, ref_v = cache.k.clone(), cache.v.clone()
    ops.kv_write.reference(ref_k, ref_v, k, v, slot_mapping)
    torch.testing.assert_close(k_cache, ref_k, rtol=0, atol=0, equal_nan=True)   # a copy: bit-exact
    torch.testing.assert_close(v_cache, ref_v, rtol=0, atol=0, equal_nan=True)
    no_fallback(npu)


def test_kv_write_duplicate_rows_are_refused_by_the_double(npu):
    """Two tokens on one row: the kernel keeps an unspecified one, so the double raises (the
    engine gives each padding token its own scratch row)."""
    cache = paged_cache(2, 64, torch.bfloat16, block_size=16)
    k = randn(1, 3, 2, 64, dtype=torch.bfloat16)
    shared_scratch = torch.tensor([[cache.scratch_base] * 3])
    with pytest.raises(ValueError, match="duplicate slots"):
        npu.kv_write(cache.k, cache.v, k, k, shared_scratch)


def test_kv_write_float32_runs_the_reference(npu):
    """A2/A3's scatter kernel has no float32 (only fp16/bf16/int8): the reference writes instead."""
    cache = paged_cache(1, 16, torch.float32, block_size=16)
    k, v = randn(1, 2, 1, 16), randn(1, 2, 1, 16, seed=1)
    rows = torch.tensor([[5, 40]])
    npu.kv_write(cache.k, cache.v, k, v, rows)
    flat = cache.k.view(-1, 1, 16)
    assert torch.equal(flat[5], k[0, 0]) and torch.equal(flat[40], k[0, 1]) and flat[6].isnan().all()
    assert list(npu.fallbacks()) == [("kv_write", "npu_scatter_pa_kv_cache takes float16/bfloat16, not float32")]


# -- attention -----------------------------------------------------------------------------
BATCH_SLOTS = torch.tensor([2, 0, 3])
CACHED = torch.tensor([5, 13, 9])                 # tokens already cached per request


def attention_case(shape: Shape, kind: str, dtype: torch.dtype, block_size: int = 128, cached=CACHED):
    """q, paged caches, block table, mask, scale (+ the host facts) for one engine situation.

    Stale rows (never written, or rolled back) hold large finite values, blocks nobody owns
    5e2: a kernel reading past the mask would show. S = the table columns covering the
    furthest key * block_size, as `BlockTables.set_view` makes it."""
    batch = len(cached)
    if kind == "prefill":                                    # ragged prompts, right-padded
        t = 7
        q_lens = torch.tensor([7, 4, 6])
        positions = torch.arange(t).expand(batch, t)
        kv_limit = positions + 1
        kv_lengths = q_lens
    elif kind == "decode":
        t = 1
        q_lens = torch.ones(batch, dtype=torch.long)
        positions = cached.unsqueeze(1)
        kv_limit = positions + 1
        kv_lengths = cached + 1
    elif kind == "verify":                                   # [anchor, d1..dK], causal
        t = 4
        q_lens = torch.full((batch,), t)
        positions = cached.unsqueeze(1) + torch.arange(t)
        kv_limit = positions + 1
        kv_lengths = cached + t
    elif kind == "block":                                    # DFlash/DSpark block: bidirectional inside
        t = 4
        q_lens = torch.full((batch,), t)
        positions = cached.unsqueeze(1) + torch.arange(t)
        kv_limit = (cached + t).unsqueeze(1).expand(batch, t)
        kv_lengths = cached + t
    else:
        raise ValueError(kind)
    max_blocks = 2 if block_size >= 128 else -(-64 // block_size)
    cache = paged_cache(shape.kv_heads, shape.head_dim, dtype, max_blocks=max_blocks, block_size=block_size, seed=1)
    cache.k.copy_(randn(*cache.k.shape, dtype=dtype, seed=1))
    cache.v.copy_(randn(*cache.v.shape, dtype=dtype, seed=2))
    owned = torch.zeros(cache.k.shape[0], block_size, dtype=torch.bool)
    for b, slot in enumerate(BATCH_SLOTS.tolist()):
        for j, blk in enumerate(cache.table[slot].tolist()):
            pos = j * block_size + torch.arange(block_size)
            stale = pos >= int(kv_lengths[b])
            owned[blk] = True
            cache.k[blk, stale] = 1e3
            cache.v[blk, stale] = -1e3
    cache.k[~owned] = 5e2                                  # blocks no request in the batch owns
    cache.v[~owned] = 5e2
    cache.k[cache.null_block] = 0
    cache.v[cache.null_block] = 0
    nb = -(-int(kv_limit.max()) // block_size)
    table = cache.table[BATCH_SLOTS, :nb].contiguous()
    window = shape.window if kind in ("prefill", "verify") else None
    mask = ops.build_attention_mask(positions, kv_limit, nb * block_size, window)
    q = randn(batch, t, shape.heads, shape.head_dim, dtype=dtype, seed=3)
    valid = torch.arange(t)[None, :] < q_lens[:, None]
    facts = dict(kv_lengths=kv_lengths.tolist(), query_lengths=q_lens.tolist(), valid=valid, window=window)
    return (q, cache.k, cache.v, table, mask, shape.head_dim ** -0.5), facts


KINDS = ["prefill", "decode", "verify", "block"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FUSED)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_attention_paged(npu, shape, dtype, kind):
    """No hints: every row attends over all S keys through the block table, the mask hides the rest."""
    args, facts = attention_case(shape, kind, dtype)
    out = npu.attention(*args)
    ref = ops.attention.reference(*args)
    close(out, ref, dtype)
    assert out[facts["valid"]].abs().max() < 50, "stale cache rows (|v| = 1000) must stay masked"
    no_fallback(npu)
    assert npu.attention_modes() == {"paged": 1}


HINT_KINDS = {"prefill": "causal", "decode": "causal", "verify": "causal", "block": "prefix"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_attention_with_host_hints(npu, shape, kind, monkeypatch):
    """With the caller's host lengths: causal masks become sparse_mode=3 (rightDownCausal) over
    actual_seq_lengths / actual_seq_lengths_kv, block drafting a plain kv length, sliding
    windows stay explicit. Same result on every real query (padding queries are don't-care)."""
    dtype = torch.bfloat16
    args, facts = attention_case(shape, kind, dtype)
    hint_kind = "explicit" if facts["window"] else HINT_KINDS[kind]
    hints = AttentionHints(facts["kv_lengths"], facts["query_lengths"], kind=hint_kind)
    seen = spy(npu, monkeypatch, "npu_fused_infer_attention_score")
    out = npu.attention(*args, ForwardContext(hints=hints))
    ref = ops.attention.reference(*args)
    valid = facts["valid"]
    close(out[valid], ref[valid], dtype)
    (_, kwargs), = seen
    assert kwargs["actual_seq_lengths_kv"] == facts["kv_lengths"]
    t = args[0].shape[1]
    if hint_kind == "causal" and t > 1:
        assert kwargs["sparse_mode"] == 3 and kwargs["actual_seq_lengths"] == facts["query_lengths"]
        assert kwargs["atten_mask"].shape == (2048, 2048) and kwargs["atten_mask"].dtype == torch.int8
        assert torch.equal(kwargs["atten_mask"], torch.ones(2048, 2048, dtype=torch.int8).triu(1))
    elif hint_kind == "explicit":
        assert kwargs["sparse_mode"] == 0 and torch.equal(kwargs["atten_mask"], ~args[4])
    else:                                         # prefix, or causal with one query per row
        assert kwargs["sparse_mode"] == 0 and kwargs["atten_mask"] is None and kwargs["actual_seq_lengths"] is None
    assert kwargs["inner_precise"] == (2 if hint_kind == "explicit" and t > 1 else 0)
    no_fallback(npu)


def test_attention_passes_the_documented_arguments(npu, monkeypatch):
    seen = spy(npu, monkeypatch, "npu_fused_infer_attention_score")
    (q, k_cache, v_cache, table, mask, scale), _ = attention_case(SHAPES[0], "verify", torch.bfloat16)
    npu.attention(q, k_cache, v_cache, table, mask, scale)
    (args, kwargs), = seen
    query, key, value = args
    blocks = k_cache.shape[0]
    assert query.shape == (3, 4, 9, 64)
    assert key.shape == value.shape == (blocks, 128, 3 * 64), "paged BSND takes (blocknum, block_size, H)"
    assert key.data_ptr() == k_cache.data_ptr() and value.data_ptr() == v_cache.data_ptr(), "a view, no copy"
    assert kwargs.pop("block_table") is table and table.dtype == torch.int32
    assert torch.equal(kwargs.pop("atten_mask"), ~mask), "torch_npu masks OUT where True"
    assert kwargs == dict(actual_seq_lengths=None, actual_seq_lengths_kv=[mask.shape[-1]] * 3, num_heads=9,
                          scale=scale, input_layout="BSND", num_key_value_heads=3, sparse_mode=0, inner_precise=2,
                          block_size=128), "Q_S > 1 with a user mask: invalid-row correction (inner_precise 2)"


@pytest.mark.parametrize("kind", KINDS)
def test_attention_with_small_blocks_gathers_or_pages_by_branch(npu, kind, monkeypatch, caplog):
    """block_size 16: Q_S == 1 (decode) may page (a multiple of 16), Q_S > 1 may not (needs a
    multiple of 128): those rows' blocks are gathered first, announced once."""
    seen = spy(npu, monkeypatch, "npu_fused_infer_attention_score")
    args, _ = attention_case(SHAPES[1], kind, torch.bfloat16, block_size=16)
    with caplog.at_level("WARNING", logger="ops"):
        close(npu.attention(*args), ops.attention.reference(*args), torch.bfloat16)
        npu.attention(*args)
    (call_args, kwargs), _ = seen
    if kind == "decode":
        assert npu.attention_modes() == {"paged": 2} and kwargs["block_size"] == 16
    else:
        assert npu.attention_modes() == {"gathered": 2}
        assert kwargs["block_table"] is None and kwargs["block_size"] == 0
        assert call_args[1].shape == (3, args[4].shape[-1], 8, 128) and call_args[1].is_contiguous()
        assert sum("gathers K/V" in r.message for r in caplog.records) == 1
    no_fallback(npu)


def test_attention_hints_must_fit_the_call(npu):
    args, facts = attention_case(SHAPES[1], "verify", torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        npu.attention(*args, ForwardContext(hints=AttentionHints(facts["kv_lengths"][:2])))
    with pytest.raises(ValueError, match="do not fit"):
        npu.attention(*args, ForwardContext(hints=AttentionHints([10_000] * 3)))


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_attention_float32_and_odd_head_dims_run_the_reference(npu, kind):
    """FIA takes fp16/bf16 queries only and D % 16 == 0: float32, or D = 40, run the reference."""
    args, _ = attention_case(SHAPES[0], kind, torch.float32)
    assert torch.equal(npu.attention(*args), ops.attention.reference(*args))
    odd = Shape("d40", hidden=80, heads=2, kv_heads=1, head_dim=40, intermediate=8)
    args, _ = attention_case(odd, kind, torch.bfloat16)
    assert torch.equal(npu.attention(*args), ops.attention.reference(*args))
    assert sorted(npu.fallbacks()) == [
        ("attention", "npu_fused_infer_attention_score needs D <= 512 and a multiple of 16 for fp16/bf16, got 40"),
        ("attention", "npu_fused_infer_attention_score takes float16/bfloat16, not float32"),
    ]


def test_the_double_would_reject_what_the_backend_avoids(npu):
    """The guards are not decoration: the hardware limits they avoid are enforced by the double."""
    (q, k_cache, v_cache, table, mask, scale), _ = attention_case(SHAPES[0], "prefill", torch.float32)
    key = k_cache.view(k_cache.shape[0], 128, -1)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        npu.torch_npu.npu_fused_infer_attention_score(q, key, key, num_heads=9, num_key_value_heads=3,
                                                      input_layout="BSND", block_table=table, block_size=128,
                                                      actual_seq_lengths_kv=[7, 7, 7])
    with pytest.raises(TypeError, match="float16/bfloat16/int8"):
        npu.torch_npu.npu_scatter_pa_kv_cache(k_cache[0, :4], k_cache[0, :4], k_cache, v_cache,
                                              torch.arange(4, dtype=torch.int32), cache_mode="Norm")
    with pytest.raises(TypeError, match="gamma dtype"):
        npu.torch_npu.npu_rms_norm(q.bfloat16(), torch.ones(64), epsilon=1e-6)
    (q, k_cache, v_cache, table, _, _), _ = attention_case(SHAPES[0], "prefill", torch.bfloat16, block_size=16)
    with pytest.raises(ValueError, match="multiple of 128"):          # what the "gathered" mode avoids
        npu.torch_npu.npu_fused_infer_attention_score(
            q, k_cache.flatten(2), v_cache.flatten(2), num_heads=9, num_key_value_heads=3, input_layout="BSND",
            block_table=table, block_size=16, actual_seq_lengths_kv=[7, 7, 7])


# -- attention in an NPU graph -------------------------------------------------------------
@pytest.fixture
def npu_graph_platform(npu, monkeypatch):
    """An NpuPlatform on the double (whose graphs the backend registers its attention with)."""
    from ascend_dspark.platform import npu as npu_platform

    fake_torch_npu.patch_npu_platform(monkeypatch)
    monkeypatch.setattr(npu_platform, "_TORCH_NPU", sys.modules["torch_npu"])
    return npu_platform.NpuPlatform()


def test_attention_in_a_graph_refreshes_its_lengths_before_each_replay(npu, npu_graph_platform):
    """Captured under hints, replayed after `hints.update(...)`: the graph re-issues the fused
    attention (.out, max workspace) with the new lengths before each replay; results equal an
    eager call with those lengths. The double refuses a replay without that update."""
    args, facts = attention_case(SHAPES[1], "verify", torch.bfloat16)
    q, k_cache, v_cache, table, mask, scale = args
    hints = AttentionHints(facts["kv_lengths"], facts["query_lengths"], kind="causal")
    q_static = q.clone()

    graph = npu_graph_platform.graph()
    ctx = ForwardContext(hints=hints, graph=graph)
    out = graph.capture(lambda: npu.attention(q_static, k_cache, v_cache, table, mask, scale, ctx))
    close(out, npu.attention(*args, ForwardContext(hints=hints)), torch.bfloat16)
    tasks = graph._tasks
    assert len(tasks) == 1
    recorded = [r.func._schema.name for r in graph._graph._records]
    assert "npu::_npu_fused_infer_attention_score_get_max_workspace" in recorded
    assert [str(r.func) for r in tasks[0].handle.records] == ["npu.npu_fused_infer_attention_score.out"]

    # the next step: one more accepted token per row, new queries copied into the static buffer
    new_q = randn(*q.shape, dtype=q.dtype, seed=9)
    q_static.copy_(new_q)
    new_kv = [n - 1 for n in facts["kv_lengths"]]                  # e.g. after a rollback
    hints.update(new_kv, facts["query_lengths"])
    graph.replay()
    eager = npu.attention(new_q, k_cache, v_cache, table, mask, scale,
                          ForwardContext(hints=AttentionHints(new_kv, facts["query_lengths"], kind="causal")))
    assert torch.equal(out, eager)
    events = [e[0] for e in graph._graph.events]
    assert events == ["capture_begin", "capture_end", "task_update", "replay", "task_update", "replay"]
    with pytest.raises(RuntimeError, match="without a sequence-length update"):
        graph._graph.replay()


def test_attention_captured_outside_the_platform_graph_is_refused(npu, npu_graph_platform):
    args, _ = attention_case(SHAPES[1], "verify", torch.bfloat16)
    npu.attention(*args)                                          # eager first, as a warmup would
    with pytest.raises(RuntimeError, match="without its graph in the forward context"):
        with torch.npu.graph(torch.npu.NPUGraph()):
            npu.attention(*args)
