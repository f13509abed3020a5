"""The reference ops (the spec every backend is held to) against independent formulas.

Each op is checked on model-shaped inputs (SmolLM2, Qwen3-8B, Gemma3, odd sizes; see
op_cases.py) in fp32 and bf16 against a float64 formula written differently from the op:
RMSNorm from its definition, the activations from their closed forms, RoPE as complex
multiplication, attention as an explicit softmax over a mask built by Python loops, and
the KV write against a NaN-poisoned cache (every element it should not touch stays NaN).
The `.reference` entry points are called so the platform's backend never interferes.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_cases import CASE_PARAMS, DTYPES, TOL, inv_freq, norm_weight, randn

import ops

ROWS = (2, 3)                       # leading dims of activations: [batch, tokens, ...]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


# -- norms ---------------------------------------------------------------------------------

def _rms_formula(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    x = x.double()
    rms = torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return x / rms * (offset + w.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("where", ["hidden", "head"])
def test_rms_norm_matches_formula(case, dtype, where):
    gen = torch.Generator().manual_seed(0)
    dim = case.hidden if where == "hidden" else case.head_dim       # layer norms / Qwen3-Gemma3 q-k norms
    shape = (*ROWS, dim) if where == "hidden" else (*ROWS, case.heads, dim)
    x = 2.0 * randn(*shape, dtype=dtype, gen=gen)
    w = norm_weight(case, dim, dtype, gen=gen)
    out = ops.rms_norm.reference(x, w, case.eps, case.offset)
    assert out.shape == x.shape and out.dtype == dtype
    _close(out, _rms_formula(x, w, case.eps, case.offset), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_add_rms_norm_matches_formula(case, dtype):
    gen = torch.Generator().manual_seed(1)
    x, res = randn(*ROWS, case.hidden, dtype=dtype, gen=gen), randn(*ROWS, case.hidden, dtype=dtype, gen=gen)
    w = norm_weight(case, case.hidden, dtype, gen=gen)
    normed, summed = ops.add_rms_norm.reference(x, res, w, case.eps, case.offset)
    # The sum is one correctly rounded addition.
    assert torch.equal(summed, (x.double() + res.double()).to(dtype))
    _close(normed, _rms_formula(summed, w, case.eps, case.offset), dtype)


def test_rms_norm_scale_invariance_and_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = ops.rms_norm.reference(x, torch.ones(2), 0.0 + 1e-12)
    torch.testing.assert_close(out[0], torch.tensor([3.0, 4.0]) / math.sqrt(12.5))
    assert torch.equal(out[1], torch.zeros(2))                      # eps keeps a zero row finite


# -- activations ---------------------------------------------------------------------------

def _silu_formula(g, u):
    g = g.double()
    return g / (1.0 + torch.exp(-g)) * u.double()


def _gelu_tanh_formula(g, u):
    g = g.double()
    return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3))) * u.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activations_match_formula(case, dtype, act):
    gen = torch.Generator().manual_seed(2)
    g = 3.0 * randn(*ROWS, case.intermediate, dtype=dtype, gen=gen)
    u = randn(*ROWS, case.intermediate, dtype=dtype, gen=gen)
    op, formula = {"silu": (ops.silu_and_mul, _silu_formula),
                   "gelu_tanh": (ops.gelu_tanh_and_mul, _gelu_tanh_formula)}[act]
    out = op.reference(g, u)
    assert out.shape == g.shape and out.dtype == dtype
    _close(out, formula(g, u), dtype)


# -- rotary --------------------------------------------------------------------------------

def test_rotary_cos_sin_matches_math():
    freqs = inv_freq(8)
    positions = torch.tensor([[0, 1, 7], [30, 31, 45]])
    cos, sin = ops.rotary_cos_sin(freqs, positions, scaling=0.5)
    assert cos.shape == (2, 3, 8) and cos.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            for j in range(8):
                angle = positions[b, t].item() * freqs[j % 4].item()
                assert abs(cos[b, t, j].item() - 0.5 * math.cos(angle)) < 1e-5
                assert abs(sin[b, t, j].item() - 0.5 * math.sin(angle)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("which", ["q", "k"])
def test_apply_rotary_is_complex_multiplication(case, dtype, which):
    gen = torch.Generator().manual_seed(3)
    heads, rot, half = (case.heads if which == "q" else case.kv_heads), case.rotary_dim, case.rotary_dim // 2
    x = randn(*ROWS, heads, case.head_dim, dtype=dtype, gen=gen)
    positions = torch.randint(0, 48, ROWS, generator=gen)
    freqs = inv_freq(rot)
    cos, sin = ops.rotary_cos_sin(freqs, positions, dtype=dtype)
    out = ops.apply_rotary.reference(x, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype

    # Pair dimension j with j + R/2 as one complex number and rotate it by position * freq_j.
    xd = x.double()
    z = torch.complex(xd[..., :half], xd[..., half:rot])
    angle = positions.double()[..., None, None] * freqs
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    _close(out[..., :half], rotated.real, dtype)
    _close(out[..., half:rot], rotated.imag, dtype)
    assert torch.equal(out[..., rot:], x[..., rot:])               # partial rotary: tail untouched


# -- KV write -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_kv_write_touches_only_its_rows(case, dtype):
    gen = torch.Generator().manual_seed(4)
    blocks, block_size, bsz, t = 5, 4, 3, 4
    shape = (blocks, block_size, case.kv_heads, case.head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    k = randn(bsz, t, case.kv_heads, case.head_dim, gen=gen)          # fp32 in, cast to the cache dtype
    v = randn(bsz, t, case.kv_heads, case.head_dim, gen=gen)
    rows = torch.tensor([[0, 1, 2, 19], [9, 10, 11, 4], [18, 7, 17, 13]])   # any distinct flat rows
    ops.kv_write.reference(k_cache, v_cache, k, v, rows)

    written = {rows[b, i].item(): (b, i) for b in range(bsz) for i in range(t)}
    for r in range(blocks * block_size):
        kr, vr = k_cache[r // block_size, r % block_size], v_cache[r // block_size, r % block_size]
        if r in written:
            b, i = written[r]
            assert torch.equal(kr, k[b, i].to(dtype)) and torch.equal(vr, v[b, i].to(dtype))
        else:
            assert kr.isnan().all() and vr.isnan().all(), r


# -- attention ------------------------------------------------------------------------------

def _python_mask(positions: list[list[int]], limits: list[list[int]], num_keys: int, window: int | None):
    return torch.tensor([[[
        [s < limits[b][i] and (window is None or s > positions[b][i] - window) for s in range(num_keys)]
        for i in range(len(positions[b]))]] for b in range(len(positions))])


def _mask_case(kind: str):
    """(positions, kv_limit, window) for two requests of 4 tokens with cached context before them."""
    positions = [[5, 6, 7, 8], [9, 10, 11, 12]]
    if kind == "causal":                # prefill / decode / verification
        return positions, [[p + 1 for p in row] for row in positions], None
    if kind == "block":                 # DFlash/DSpark block: bidirectional inside the block
        return positions, [[row[0] + len(row)] * len(row) for row in positions], None
    if kind == "window":                # Gemma3 sliding layers
        return positions, [[p + 1 for p in row] for row in positions], 4
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["causal", "block", "window"])
def test_build_attention_mask_matches_python(kind):
    positions, limits, window = _mask_case(kind)
    num_keys = 13
    mask = ops.build_attention_mask(torch.tensor(positions), torch.tensor(limits), num_keys, window)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 4, num_keys)
    assert torch.equal(mask, _python_mask(positions, limits, num_keys, window))
    if kind == "block":                 # every block query sees the whole block, nothing after it
        assert mask[0, 0, 0, 8] and not mask[0, 0, 3, 9]
    if kind == "window":                # exactly `window` keys visible, ending at the query itself
        assert (mask.sum(-1) == 4).all()


def _attention_formula(q, k_cache, v_cache, block_table, mask, scale):
    bsz, t, hq, d = q.shape
    num_keys, block_size, hkv = mask.shape[-1], k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(bsz, t, hq, d, dtype=torch.float64)
    for b in range(bsz):
        where = [(int(block_table[b, s // block_size]), s % block_size) for s in range(num_keys)]
        keys = torch.stack([k_cache[blk, off] for blk, off in where]).double()     # [S, Hkv, D]
        vals = torch.stack([v_cache[blk, off] for blk, off in where]).double()
        for h in range(hq):
            kv = h // (hq // hkv)                                    # GQA: consecutive q heads share a kv head
            scores = q[b, :, h].double() @ keys[:, kv].T * scale     # [T, S]
            scores = scores.masked_fill(~mask[b, 0], float("-inf"))
            probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
            probs = probs / probs.sum(-1, keepdim=True)
            out[b, :, h] = probs @ vals[:, kv]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("kind", ["causal", "block", "window"])
def test_attention_matches_explicit_softmax(case, dtype, kind):
    gen = torch.Generator().manual_seed(5)
    positions, limits, window = _mask_case(kind)
    num_keys, block_size = 13, 4
    q = randn(2, 4, case.heads, case.head_dim, dtype=dtype, gen=gen)
    k_cache = randn(9, block_size, case.kv_heads, case.head_dim, dtype=dtype, gen=gen)
    v_cache = randn(9, block_size, case.kv_heads, case.head_dim, dtype=dtype, gen=gen)
    block_table = torch.tensor([[7, 2, 5, 0], [1, 8, 3, 6]], dtype=torch.int32)    # scattered blocks
    for b in range(2):                                # keys past the mask's width are never read
        k_cache[block_table[b, 3], num_keys % block_size:] = float("nan")
        v_cache[block_table[b, 3], num_keys % block_size:] = float("nan")
    k_cache[4], v_cache[4] = float("nan"), float("nan")            # nor are blocks outside the table
    mask = _python_mask(positions, limits, num_keys, window)
    scale = case.head_dim ** -0.5
    out = ops.attention.reference(q, k_cache, v_cache, block_table, mask, scale)
    assert out.shape == q.shape and out.dtype == dtype
    _close(out, _attention_formula(q, k_cache, v_cache, block_table, mask, scale), dtype)
