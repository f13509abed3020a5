"""Ascend NPU backend of ops/: each op is one torch_npu fused kernel, called per torch_npu 2.13.0.

`ops.registry` imports this module the first time an op runs on the NPU platform's device.
`import torch_npu` below raises ImportError / OSError / RuntimeError without Huawei's CANN
runtime; the registry catches that, logs it once and keeps the reference ops.

Every call binds against the real op schemas (the `m.def()` strings of the 2.13.0 wheel,
pinned in tests/platform/torch_npu_2.13.0_contract.json and linted by
`ascend_dspark.platform.npu_contract.check_calls`); arguments after the first few are passed
by their schema names. The documented semantics and A2/A3 limits come from
shared/reference/ascend.md and the op-plugin / ops-transformer docs.

    op                torch_npu kernel
    rms_norm          npu_rms_norm(input, gamma, epsilon=) -> (y, rstd)
    add_rms_norm      npu_add_rms_norm(x1, x2, gamma, epsilon=) -> (y, rstd, x1 + x2)
    silu_and_mul      npu_swiglu(input, dim=-1)                  input = cat([gate, up], -1)
    apply_rotary      npu_rotary_mul(input, r1, r2, rotary_mode="half")
    kv_write          npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping,
                                              cache_mode="Norm")
    attention         npu_fused_infer_attention_score(query, key, value, atten_mask=, num_heads=,
                                              num_key_value_heads=, scale=, input_layout="BSND",
                                              sparse_mode=0, inner_precise=0)
    gelu_tanh_and_mul not registered: torch_npu 2.13 has no pinned fused GeGLU-tanh kernel, so
                      the reference (two plain torch ops) runs on the NPU.
    top_k_top_p       npu_top_k_top_p, in ops/backends/npu_sampling.py (imported below).

Inputs a kernel does not accept on A2/A3 (a dtype it lacks, e.g. float32 attention or KV
writes, float64 anywhere; shapes past its documented limits) are NOT cast: that op runs
the plain-torch reference instead, and the first such call per (op, reason) is logged as a
warning. So a float32 model on the NPU keeps float32 numerics (the fused norm / activation
/ rotary kernels take float32; attention and the KV write run the reference); load the model
in bfloat16 (the NPU platform's default dtype) to use every fused kernel. `fallbacks()`
reports what ran the reference and how often. All guards look at shapes and dtypes only:
nothing here reads device data, so every op can be captured in an NPU graph.
"""

from __future__ import annotations

import logging

import torch
import torch_npu

from ops.activation import silu_and_mul as _silu_and_mul_entry
from ops.attention import attention as _attention_entry
from ops.kv_cache import kv_write as _kv_write_entry
from ops.norm import add_rms_norm as _add_rms_norm_entry
from ops.norm import rms_norm as _rms_norm_entry
from ops.registry import register
from ops.rotary import apply_rotary as _apply_rotary_entry

# Registers the sampling ops' "npu" implementations. A plain `import` (not `from . import`)
# so that it really re-imports when the module was unloaded (tests) but the package attribute stays.
import ops.backends.npu_sampling  # noqa: E402,F401

logger = logging.getLogger("ops")

BACKEND = "npu"
# dtypes each kernel accepts on Atlas A2/A3 (op-plugin / ops-transformer docs).
NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)       # npu_rms_norm, npu_add_rms_norm
SWIGLU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)     # npu_swiglu
ROTARY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)     # npu_rotary_mul
KV_CACHE_DTYPES = (torch.float16, torch.bfloat16)                  # npu_scatter_pa_kv_cache (+ int8, unused)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)                 # npu_fused_infer_attention_score query
INNER_PRECISE = 0   # FIA: high precision, no invalid-row correction (see attention())

_REFERENCES = {
    "rms_norm": _rms_norm_entry.reference,
    "add_rms_norm": _add_rms_norm_entry.reference,
    "silu_and_mul": _silu_and_mul_entry.reference,
    "apply_rotary": _apply_rotary_entry.reference,
    "kv_write": _kv_write_entry.reference,
    "attention": _attention_entry.reference,
}
_fallbacks: dict[tuple[str, str], int] = {}


def fallbacks() -> dict[tuple[str, str], int]:
    """(op, reason) -> number of calls that ran the reference instead of the torch_npu kernel."""
    return dict(_fallbacks)


def _reference(op: str, reason: str, *args):
    """Run the reference of `op`, logging the reason the first time (op, reason) is seen."""
    key = (op, reason)
    if key not in _fallbacks:
        _fallbacks[key] = 0
        logger.warning("ops: %s on the NPU runs the reference (plain torch): %s", op, reason)
    _fallbacks[key] += 1
    return _REFERENCES[op](*args)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unsupported_dtype(kernel: str, dtype: torch.dtype, allowed) -> str | None:
    if dtype in allowed:
        return None
    return f"{kernel} takes {'/'.join(map(_dtype_name, allowed))}, not {_dtype_name(dtype)}"


# -- norms -----------------------------------------------------------------------------
def _norm_guard(kernel: str, x: torch.Tensor, weight: torch.Tensor, offset: float) -> str | None:
    why = _unsupported_dtype(kernel, x.dtype, NORM_DTYPES)
    if why:
        return why
    if not 1 <= x.dim() <= 8 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return (f"{kernel} needs a 1-8-D input and a gamma over its last dim "
                f"(got {tuple(x.shape)} / {tuple(weight.shape)})")
    if not offset and weight.dtype != x.dtype:
        # gamma must have the input's dtype; the reference promotes `weight * x` instead.
        return f"{kernel} needs gamma.dtype == input.dtype ({_dtype_name(weight.dtype)} vs {_dtype_name(x.dtype)})"
    return None


def _gamma(weight: torch.Tensor, offset: float, dtype: torch.dtype) -> torch.Tensor:
    """The kernel computes y = x * rstd * gamma. Gemma (offset 1) scales by (1 + w): that sum is
    formed in float32, as in the reference, and rounded once to the input dtype."""
    if offset:
        return (weight.float() + offset).to(dtype)
    return weight


@register("rms_norm", BACKEND)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """torch_npu.npu_rms_norm(x, gamma, epsilon=eps) -> (y, rstd); returns y.

    rstd (float32, kept for the backward pass) is dropped. gamma = weight (Llama, Qwen3) or
    1 + weight (Gemma, offset=1). The kernel keeps its statistics in float32, as the
    reference does; it rounds y once where the reference rounds x*rstd before the weight.
    """
    why = _norm_guard("npu_rms_norm", x, weight, offset)
    if why:
        return _reference("rms_norm", why, x, weight, eps, offset)
    y, _rstd = torch_npu.npu_rms_norm(x, _gamma(weight, offset, x.dtype), epsilon=float(eps))
    return y


@register("add_rms_norm", BACKEND)
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_npu.npu_add_rms_norm(x, residual, gamma, epsilon=eps) -> (y, rstd, x + residual).

    Returns (y, x + residual): the kernel's third output is the sum, i.e. the new residual
    stream. x1/x2 must have equal shapes and dtypes (no broadcasting, unlike `x + residual`).
    """
    why = _norm_guard("npu_add_rms_norm", x, weight, offset)
    if why is None and (residual.shape != x.shape or residual.dtype != x.dtype):
        why = "npu_add_rms_norm needs x1 and x2 of one shape and dtype"
    if why:
        return _reference("add_rms_norm", why, x, residual, weight, eps, offset)
    y, _rstd, summed = torch_npu.npu_add_rms_norm(x, residual, _gamma(weight, offset, x.dtype), epsilon=float(eps))
    return y, summed


# -- activation ------------------------------------------------------------------------
@register("silu_and_mul", BACKEND)
def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """torch_npu.npu_swiglu(cat([gate, up], -1), dim=-1) = silu(gate) * up.

    The kernel splits its (contiguous) input in two halves along `dim` and returns
    silu(A) * B with A the FIRST half, so gate goes first. The concatenation is one extra
    copy because our models keep separate gate/up projections (a merged gate_up weight
    would feed the kernel directly).
    """
    why = _unsupported_dtype("npu_swiglu", gate.dtype, SWIGLU_DTYPES)
    if why is None and (up.dtype != gate.dtype or up.shape != gate.shape or not 1 <= gate.dim() <= 8):
        why = "npu_swiglu needs gate and up of one shape and dtype (1-8-D)"
    if why:
        return _reference("silu_and_mul", why, gate, up)
    return torch_npu.npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)


# -- rotary ----------------------------------------------------------------------------
@register("apply_rotary", BACKEND)
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """torch_npu.npu_rotary_mul(x, r1=cos, r2=sin, rotary_mode="half") on the first R dims.

    'half' is the neox layout of the reference: out = x * r1 + rotate_half(x) * r2 with
    rotate_half(x) = cat(-x2, x1). The kernel's optional `rotate` tensor (a D x D rotation
    matrix replacing rotate_half) is not used. x [B, T, H, D] is the BSND layout; cos/sin
    [B, T, R] become r1/r2 [B, T, 1, R], the broadcast form (BS1D) the kernel documents for
    BSND inputs. Partial rotary (R < D): the kernel rotates x[..., :R] (made contiguous) and
    the tail D - R is concatenated back unchanged.

    A2/A3 limits checked here: 4-D input, R even and < 896, B and H < 1000, r1/r2 of the
    input's dtype. The docs also state r1/r2 values lie in [-1, 1]; cos/sin scaled by a
    RoPE attention factor > 1 (YaRN-style) exceed that and are passed as they are (the op is
    elementwise; checking values would need a device sync).
    """
    rot = cos.shape[-1]
    why = _unsupported_dtype("npu_rotary_mul", x.dtype, ROTARY_DTYPES)
    if why is None:
        if x.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape or cos.shape[0] not in (1, x.shape[0]) \
                or cos.shape[1] != x.shape[1]:
            why = f"npu_rotary_mul: x {tuple(x.shape)} / cos {tuple(cos.shape)} is not BSND with BS1D cos/sin"
        elif cos.dtype != x.dtype or sin.dtype != x.dtype:
            why = "npu_rotary_mul needs r1/r2 of the input's dtype"
        elif rot % 2 or rot > x.shape[-1] or rot >= 896 or x.shape[0] >= 1000 or x.shape[2] >= 1000:
            why = f"npu_rotary_mul limits (R even, R < 896, B and N < 1000): R={rot}, x {tuple(x.shape)}"
    if why:
        return _reference("apply_rotary", why, x, cos, sin)
    r1 = cos.unsqueeze(-2).contiguous()
    r2 = sin.unsqueeze(-2).contiguous()
    if rot == x.shape[-1]:
        return torch_npu.npu_rotary_mul(x.contiguous(), r1, r2, rotary_mode="half")
    head = torch_npu.npu_rotary_mul(x[..., :rot].contiguous(), r1, r2, rotary_mode="half")
    return torch.cat((head, x[..., rot:]), dim=-1)


# -- KV cache --------------------------------------------------------------------------
@register("kv_write", BACKEND)
def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
    """torch_npu.npu_scatter_pa_kv_cache(key, value, k_cache, v_cache, slot_mapping, cache_mode="Norm").

    The slot cache [num_slots, capacity + 1, Hkv, D] IS a paged cache in the kernel's ND
    layout [num_blocks, block_size, N, D] with one block per slot (block_size = capacity + 1),
    so it is passed as is. slot_mapping[b * T + t] = slot_ids[b] * (capacity + 1) + position,
    int32 (int64 if the cache has 2**31 rows or more); padding tokens (valid False) go to their
    slot's scratch row (the last position), never -1: the kernel requires every entry in
    [0, num_blocks * block_size). Several padding tokens of one slot therefore share the
    scratch row; the kernel does not guarantee which duplicate lands, and nothing reads that
    row. cache_mode="Norm" selects ND caches; the schema default 'PA_NZ' means FRACTAL_NZ
    caches. key/value are [B * T, Hkv, D], contiguous, in the cache dtype (fp16/bf16 on A2/A3).
    Valid positions must be < capacity, as the engine guarantees: the reference would raise
    on an out-of-range index, the kernel would write into the next slot's rows (checking
    would need a device sync).
    """
    why = _unsupported_dtype("npu_scatter_pa_kv_cache", k_cache.dtype, KV_CACHE_DTYPES)
    if why is None and (v_cache.dtype != k_cache.dtype or k_cache.dim() != 4 or v_cache.shape[:2] != k_cache.shape[:2]
                        or not k_cache.is_contiguous() or not v_cache.is_contiguous() or k.dim() != 4):
        why = "npu_scatter_pa_kv_cache needs contiguous 4-D caches of one dtype and [B, T, N, D] keys"
    if why:
        return _reference("kv_write", why, k_cache, v_cache, k, v, slot_ids, positions, valid)
    block = k_cache.shape[1]
    rows = torch.where(valid, positions, block - 1) + slot_ids.unsqueeze(1) * block
    index_dtype = torch.int32 if k_cache.shape[0] * block < 2 ** 31 else torch.int64
    slot_mapping = rows.reshape(-1).to(index_dtype)
    key = k.reshape(-1, *k.shape[2:]).to(k_cache.dtype).contiguous()
    value = v.reshape(-1, *v.shape[2:]).to(v_cache.dtype).contiguous()
    torch_npu.npu_scatter_pa_kv_cache(key, value, k_cache, v_cache, slot_mapping, cache_mode="Norm")


# -- attention -------------------------------------------------------------------------
def _attention_guard(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor) -> str | None:
    why = _unsupported_dtype("npu_fused_infer_attention_score", q.dtype, ATTENTION_DTYPES)
    if why:
        return why
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return "npu_fused_infer_attention_score needs key/value of the query's dtype"
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return "npu_fused_infer_attention_score (BSND) needs 4-D query and caches"
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return "attention mask must be boolean [B, 1, T, S] for atten_mask"
    b, t, heads, dim = q.shape
    kv_heads, kv_len = k_cache.shape[2], mask.shape[-1]
    if heads % kv_heads or heads // kv_heads > 64 or heads > 256 or b > 65536:
        return f"npu_fused_infer_attention_score limits (N <= 256, N/KV_N <= 64, B <= 65536): {heads}/{kv_heads}, B={b}"
    if dim > 512 or dim % 16 or k_cache.shape[-1] != dim:
        return f"npu_fused_infer_attention_score needs D <= 512 and a multiple of 16 for fp16/bf16, got {dim}"
    if kv_len > k_cache.shape[1] or (t == 1 and kv_len > 262144):
        return f"npu_fused_infer_attention_score: S={kv_len} past the cache or the decode limit 262144"
    return None


@register("attention", BACKEND)
def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
              mask: torch.Tensor, scale: float) -> torch.Tensor:
    """torch_npu.npu_fused_infer_attention_score(q, K, V, ...) -> (out, lse); returns out.

    Layout "BSND": q is [B, T, Hq, D] as is; K/V are each request's first S rows gathered
    from the slot cache, [B, S, Hkv, D] contiguous (what the reference attends over too).
    num_heads = Hq, num_key_value_heads = Hkv (GQA inside the kernel), scale passed
    explicitly (the schema default is 1.0). The mask is passed in full as atten_mask with
    torch_npu's convention (True = masked OUT), i.e. ~mask, [B, 1, T, S], with sparse_mode=0
    (user mask, pre/next_tokens left at their no-band defaults): our mask also encodes
    block-bidirectional drafting and sliding windows, which the compressed causal masks of
    sparse_mode 2/3/4 cannot. No actual_seq_lengths / _kv host lists are passed: the mask
    already hides the unwritten tail, so a captured graph has no host values to refresh.
    inner_precise=0 (high precision, no invalid-row correction): every query row sees at
    least its own key, so no row is fully masked. Q_S == 1 takes the kernel's incremental
    (IFA) branch, Q_S > 1 the prompt (PFA) branch; both accept these arguments.

    Not used: the paged form (block_table + block_size) would avoid the K/V gather but needs
    block_size a multiple of 128 in [128, 512] for Q_S > 1, and one block per slot is
    capacity + 1 rows long.
    """
    why = _attention_guard(q, k_cache, v_cache, mask)
    if why:
        return _reference("attention", why, q, k_cache, v_cache, slot_ids, mask, scale)
    b, t, heads, _ = q.shape
    kv_len = mask.shape[-1]
    key = k_cache[:, :kv_len].index_select(0, slot_ids)
    value = v_cache[:, :kv_len].index_select(0, slot_ids)
    atten_mask = (~mask).expand(b, 1, t, kv_len).contiguous()
    out, _lse = torch_npu.npu_fused_infer_attention_score(
        q.contiguous(), key, value, atten_mask=atten_mask, num_heads=heads,
        num_key_value_heads=k_cache.shape[2], scale=float(scale), input_layout="BSND", sparse_mode=0,
        inner_precise=INNER_PRECISE)
    return out
