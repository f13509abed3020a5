"""Ascend NPU backend of ops/: each op is one torch_npu fused kernel, for torch_npu 2.6.0 to 2.14.0.

`ops.registry` imports this module the first time an op runs on the NPU platform's device.
`import torch_npu` below raises ImportError / OSError / RuntimeError without Huawei's CANN
runtime; the registry catches that, logs it once and keeps the reference ops.

Every call binds against the real op schemas (the `m.def()` strings of each supported
wheel, pinned one snapshot per release in tests/platform/torch_npu_contracts/ and linted by
`check_calls` of tools/npu_contract); arguments after the first few are passed
by their schema names. Where releases differ, `npu_caps.Capabilities.probe(torch_npu)` reads
the installed schemas once at import and an op adapts or is refused (runs the reference,
logged once naming the release): today kv_write is refused on 2.6.0 and on the releases
whose npu_scatter_pa_kv_cache lacks cache_mode (see ops/backends/npu_caps.py).
The documented semantics and A2/A3 limits come from
shared/reference/ascend.md and the op-plugin / ops-transformer docs.

    op                torch_npu kernel
    rms_norm          npu_rms_norm(input, gamma, epsilon=) -> (y, rstd)
    add_rms_norm      npu_add_rms_norm(x1, x2, gamma, epsilon=) -> (y, rstd, x1 + x2)
    silu_and_mul      npu_swiglu(input, dim=-1)                  input = cat([gate, up], -1)
    apply_rotary      npu_rotary_mul(input, r1, r2, rotary_mode="half")
    kv_write          npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping,
                                              cache_mode="Norm")      on the paged cache, in place
    attention         npu_fused_infer_attention_score(query, key, value, atten_mask=,
                                              actual_seq_lengths=, actual_seq_lengths_kv=,
                                              block_table=, num_heads=, scale=, input_layout="BSND",
                                              num_key_value_heads=, sparse_mode=0|3, inner_precise=0,
                                              block_size=)            paged, or over gathered K/V;
                      in a graph capture: ...score.out(..., workspace=, out=[out, lse]) with the
                      workspace of _npu_fused_infer_attention_score_get_max_workspace(...), in an
                      updatable task group of the capturing NpuGraph
    gelu_tanh_and_mul not registered: torch_npu has no pinned fused GeGLU-tanh kernel, so
                      the reference (two plain torch ops) runs on the NPU.
    top_k_top_p       npu_top_k_top_p, in ops/backends/npu_sampling.py (imported below).

Attention lives in ops/backends/npu_attention.py, the reference fallbacks every op shares in
ops/backends/npu_common.py; both are imported (and so registered) with this module.

Inputs a kernel does not accept on A2/A3 (a dtype it lacks, e.g. float32 attention or KV
writes, float64 anywhere; shapes past its documented limits) are NOT cast: that op runs
the plain-torch reference instead, and the first such call per (op, reason) is logged as a
warning. So a float32 model on the NPU keeps float32 numerics (the fused norm / activation
/ rotary kernels take float32; attention and the KV write run the reference); load the model
in bfloat16 (the NPU platform's default dtype) to use every fused kernel. `fallbacks()`
reports what ran the reference and how often. All guards look at shapes, dtypes and the
caller's host-side `AttentionHints` only: nothing here reads device data, so every op can be
captured in an NPU graph.
"""

from __future__ import annotations

import torch
import torch_npu

# Register the sampling ops' and attention's "npu" implementations. Plain `import`s (not
# `from . import`) so that they really re-import when the modules were unloaded (tests).
import ops.backends.npu_attention  # noqa: E402,F401
import ops.backends.npu_sampling  # noqa: E402,F401
from ops.backends.npu_attention import attention, attention_modes  # noqa: F401  (the backend's surface)
from ops.backends.npu_caps import Capabilities
from ops.backends.npu_common import BACKEND, dtype_name, fallbacks, run_reference, unsupported_dtype  # noqa: F401
from ops.registry import register

CAPS = Capabilities.probe(torch_npu)   # what this torch_npu release binds (ops/backends/npu_caps.py)
# dtypes each kernel accepts on Atlas A2/A3 (op-plugin / ops-transformer docs).
NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)       # npu_rms_norm, npu_add_rms_norm
SWIGLU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)     # npu_swiglu
ROTARY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)     # npu_rotary_mul
KV_CACHE_DTYPES = (torch.float16, torch.bfloat16)                  # npu_scatter_pa_kv_cache (+ int8, unused)


# -- norms -----------------------------------------------------------------------------
def _norm_guard(kernel: str, x: torch.Tensor, weight: torch.Tensor, offset: float) -> str | None:
    why = unsupported_dtype(kernel, x.dtype, NORM_DTYPES)
    if why:
        return why
    if not 1 <= x.dim() <= 8 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return (f"{kernel} needs a 1-8-D input and a gamma over its last dim "
                f"(got {tuple(x.shape)} / {tuple(weight.shape)})")
    if not offset and weight.dtype != x.dtype:
        # gamma must have the input's dtype; the reference promotes `weight * x` instead.
        return f"{kernel} needs gamma.dtype == input.dtype ({dtype_name(weight.dtype)} vs {dtype_name(x.dtype)})"
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
        return run_reference("rms_norm", why, x, weight, eps, offset)
    if x.dim() == 1:                     # the kernel wants at least 2 dims: one row of one
        return rms_norm(x.unsqueeze(0), weight, eps, offset).squeeze(0)
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
        return run_reference("add_rms_norm", why, x, residual, weight, eps, offset)
    if x.dim() == 1:
        y, summed = add_rms_norm(x.unsqueeze(0), residual.unsqueeze(0), weight, eps, offset)
        return y.squeeze(0), summed.squeeze(0)
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
    why = unsupported_dtype("npu_swiglu", gate.dtype, SWIGLU_DTYPES)
    if why is None and (up.dtype != gate.dtype or up.shape != gate.shape or not 1 <= gate.dim() <= 8):
        why = "npu_swiglu needs gate and up of one shape and dtype (1-8-D)"
    if why:
        return run_reference("silu_and_mul", why, gate, up)
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
    why = unsupported_dtype("npu_rotary_mul", x.dtype, ROTARY_DTYPES)
    if why is None:
        if x.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape or cos.shape[0] not in (1, x.shape[0]) \
                or cos.shape[1] != x.shape[1]:
            why = f"npu_rotary_mul: x {tuple(x.shape)} / cos {tuple(cos.shape)} is not BSND with BS1D cos/sin"
        elif cos.dtype != x.dtype or sin.dtype != x.dtype:
            why = "npu_rotary_mul needs r1/r2 of the input's dtype"
        elif rot % 2 or rot > x.shape[-1] or rot >= 896 or x.shape[0] >= 1000 or x.shape[2] >= 1000:
            why = f"npu_rotary_mul limits (R even, R < 896, B and N < 1000): R={rot}, x {tuple(x.shape)}"
    if why:
        return run_reference("apply_rotary", why, x, cos, sin)
    r1 = cos.unsqueeze(-2).contiguous()
    r2 = sin.unsqueeze(-2).contiguous()
    if rot == x.shape[-1]:
        return torch_npu.npu_rotary_mul(x.contiguous(), r1, r2, rotary_mode="half")
    head = torch_npu.npu_rotary_mul(x[..., :rot].contiguous(), r1, r2, rotary_mode="half")
    return torch.cat((head, x[..., rot:]), dim=-1)


# -- KV cache --------------------------------------------------------------------------
@register("kv_write", BACKEND)
def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """torch_npu.npu_scatter_pa_kv_cache(key, value, k_cache, v_cache, slot_mapping, cache_mode="Norm").

    The paged caches [physical_blocks, block_size, Hkv, D] are the kernel's ND layout
    [num_blocks, block_size, N, D] and are written in place; cache_mode="Norm" selects ND
    caches (the schema default 'PA_NZ' means FRACTAL_NZ ones). key/value are k/v flattened
    to [B * T, Hkv, D], contiguous, in the cache dtype (fp16/bf16 on A2/A3); slot_mapping is
    the flat row of each token (block * block_size + offset), int32, or int64 when the cache
    has 2**31 rows or more. Rows must be distinct and in range: the kernel does not say
    which of two writes to one row lands, and checks nothing (that would need a device
    sync); `BlockTables.slot_mapping` gives every padding token its own scratch row.
    """
    why = CAPS.refused.get("kv_write") or \
        unsupported_dtype("npu_scatter_pa_kv_cache", k_cache.dtype, KV_CACHE_DTYPES)
    if why is None and (v_cache.dtype != k_cache.dtype or k_cache.dim() != 4 or v_cache.shape[:2] != k_cache.shape[:2]
                        or not k_cache.is_contiguous() or not v_cache.is_contiguous() or k.dim() != 4
                        or k.shape[2:] != k_cache.shape[2:] or v.shape[2:] != v_cache.shape[2:]
                        or slot_mapping.shape != k.shape[:2]):
        why = "npu_scatter_pa_kv_cache needs contiguous 4-D paged caches of one dtype and [B, T, N, D] keys"
    if why:
        return run_reference("kv_write", why, k_cache, v_cache, k, v, slot_mapping)
    rows = k_cache.shape[0] * k_cache.shape[1]
    index_dtype = torch.int32 if rows < 2 ** 31 else torch.int64
    slots = slot_mapping.reshape(-1).to(index_dtype).contiguous()
    key = k.reshape(-1, *k.shape[2:]).to(k_cache.dtype).contiguous()
    value = v.reshape(-1, *v.shape[2:]).to(v_cache.dtype).contiguous()
    torch_npu.npu_scatter_pa_kv_cache(key, value, k_cache, v_cache, slots, cache_mode="Norm")
