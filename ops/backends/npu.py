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

import logging

import torch
import torch_npu

# Registers the sampling ops' "npu" implementations. A plain `import` (not `from . import`)
# so that it really re-imports when the module was unloaded (tests) but the package attribute stays.
import ops.backends.npu_sampling  # noqa: E402,F401
from ops.activation import silu_and_mul as _silu_and_mul_entry
from ops.attention import attention as _attention_entry
from ops.backends.npu_caps import Capabilities
from ops.context import AttentionHints, ForwardContext
from ops.kv_cache import kv_write as _kv_write_entry
from ops.norm import add_rms_norm as _add_rms_norm_entry
from ops.norm import rms_norm as _rms_norm_entry
from ops.registry import register
from ops.rotary import apply_rotary as _apply_rotary_entry

logger = logging.getLogger("ops")
CAPS = Capabilities.probe(torch_npu)   # what this torch_npu release binds (ops/backends/npu_caps.py)

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
        _unsupported_dtype("npu_scatter_pa_kv_cache", k_cache.dtype, KV_CACHE_DTYPES)
    if why is None and (v_cache.dtype != k_cache.dtype or k_cache.dim() != 4 or v_cache.shape[:2] != k_cache.shape[:2]
                        or not k_cache.is_contiguous() or not v_cache.is_contiguous() or k.dim() != 4
                        or k.shape[2:] != k_cache.shape[2:] or v.shape[2:] != v_cache.shape[2:]
                        or slot_mapping.shape != k.shape[:2]):
        why = "npu_scatter_pa_kv_cache needs contiguous 4-D paged caches of one dtype and [B, T, N, D] keys"
    if why:
        return _reference("kv_write", why, k_cache, v_cache, k, v, slot_mapping)
    rows = k_cache.shape[0] * k_cache.shape[1]
    index_dtype = torch.int32 if rows < 2 ** 31 else torch.int64
    slots = slot_mapping.reshape(-1).to(index_dtype).contiguous()
    key = k.reshape(-1, *k.shape[2:]).to(k_cache.dtype).contiguous()
    value = v.reshape(-1, *v.shape[2:]).to(v_cache.dtype).contiguous()
    torch_npu.npu_scatter_pa_kv_cache(key, value, k_cache, v_cache, slots, cache_mode="Norm")


# -- attention -------------------------------------------------------------------------
def _attention_guard(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     mask: torch.Tensor) -> str | None:
    why = _unsupported_dtype("npu_fused_infer_attention_score", q.dtype, ATTENTION_DTYPES)
    if why:
        return why
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return "npu_fused_infer_attention_score needs key/value of the query's dtype"
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or block_table.dim() != 2:
        return "npu_fused_infer_attention_score (BSND) needs 4-D query and paged caches and a 2-D block table"
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return "attention mask must be boolean [B, 1, T, S] for atten_mask"
    b, t, heads, dim = q.shape
    kv_heads, kv_len = k_cache.shape[2], mask.shape[-1]
    if heads % kv_heads or heads // kv_heads > 64 or heads > 256 or b > 65536:
        return f"npu_fused_infer_attention_score limits (N <= 256, N/KV_N <= 64, B <= 65536): {heads}/{kv_heads}, B={b}"
    if dim > 512 or dim % 16 or k_cache.shape[-1] != dim:
        return f"npu_fused_infer_attention_score needs D <= 512 and a multiple of 16 for fp16/bf16, got {dim}"
    if kv_len > block_table.shape[1] * k_cache.shape[1] or (t == 1 and kv_len > 262144):
        return f"npu_fused_infer_attention_score: S={kv_len} past the block table or the decode limit 262144"
    return None


def _paged_block_size_ok(block_size: int, q_len: int) -> bool:
    """FIA's page-attention block sizes (A2/A3): Q_S > 1 a multiple of 128 in [128, 512];
    Q_S == 1 a multiple of 16 (fp16/bf16) up to 512."""
    if q_len > 1:
        return block_size % 128 == 0 and 128 <= block_size <= 512
    return block_size % 16 == 0 and 0 < block_size <= 512


def _checked_hints(hints: AttentionHints | None, b: int, t: int, kv_len: int) -> AttentionHints | None:
    """The caller's hints, validated on the host against this call's shapes (a wrong hint is
    a caller bug that the kernel would turn into silently wrong attention)."""
    if hints is None:
        return None
    if hints.batch != b or max(hints.kv_lengths) > kv_len:
        raise ValueError(f"attention hints {hints} do not fit a batch of {b} rows over {kv_len} keys")
    if hints.query_lengths is not None and max(hints.query_lengths) > t:
        raise ValueError(f"attention hints {hints}: query_lengths past the {t} query tokens")
    return hints


def _causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed mask sparse_mode 2/3 require: int8 triu(ones(2048, 2048), 1), 1 = masked.

    Built once per device, outside any graph capture (capture computes nothing: a mask
    first built inside one would hold garbage until the replay)."""
    mask = _CAUSAL_MASKS.get(device)
    if mask is None:
        if torch.npu.is_current_stream_capturing():
            raise RuntimeError("the 2048x2048 causal mask must be built before graph capture "
                               "(run the step eagerly first: NpuGraph.capture's warmup does)")
        mask = torch.ones(2048, 2048, dtype=torch.int8, device=device).triu(1).contiguous()
        _CAUSAL_MASKS[device] = mask
    return mask


_CAUSAL_MASKS: dict[torch.device, torch.Tensor] = {}
_modes: dict[str, int] = {}


def attention_modes() -> dict[str, int]:
    """How the fused attention ran so far: 'paged' (block_table) / 'gathered' (K/V copied
    out of the blocks first, block size unusable for the paged form) -> number of calls."""
    return dict(_modes)


@register("attention", BACKEND)
def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              mask: torch.Tensor, scale: float, ctx: ForwardContext | None = None) -> torch.Tensor:
    """torch_npu.npu_fused_infer_attention_score over the paged cache -> (out, lse); returns out.

    Query layout "BSND" ([B, T, Hq, D] as is), num_heads = Hq, num_key_value_heads = Hkv
    (GQA inside the kernel), scale passed explicitly (the schema default is 1.0),
    inner_precise=0 (high precision; every query row sees at least one key). Q_S == 1 takes
    the kernel's incremental (IFA) branch, Q_S > 1 the prompt (PFA) branch.

    Paged form (block_table + block_size): K/V are the caches viewed as [blocks,
    block_size, Hkv * D] (the only paged layout documented for BSND queries), block_table
    int32 [B, nb], actual_seq_lengths_kv mandatory. Allowed when the block size suits the
    branch (Q_S > 1: a multiple of 128 in [128, 512]; Q_S == 1: a multiple of 16 up to 512),
    Hkv * D <= 65535 and the rows' blocks fit the cache; otherwise each row's blocks are
    gathered first ([B, S, Hkv, D], as the reference does) and the same kernel runs
    without paging ("gathered", logged once per reason).

    Lengths and masks. The kernel wants host ints per row; reading the mask back would be
    a device sync. The forward context's `AttentionHints` (ops/context.py) give them when
    known; otherwise every row attends over all S = mask.shape[-1] keys and the
    mask hides the rest (table entries past a request's blocks point at the zeroed null
    block, so nothing non-finite is read). Per hint kind:
      none / "explicit": atten_mask = ~mask [B, 1, T, S] (torch_npu masks OUT where True),
          sparse_mode=0 — this also covers block-bidirectional drafting and sliding windows,
          which the compressed causal masks cannot express;
      "causal" (Q_S > 1): sparse_mode=3 (rightDownCausal) with the compressed 2048x2048
          int8 triu mask, actual_seq_lengths = the rows' query lengths;
      "causal" with Q_S == 1, "prefix": no mask, actual_seq_lengths_kv alone.
    actual_seq_lengths_kv = the hints' kv_lengths, else [S] * B.

    Inside an NPU graph capture the call goes through the capturing graph's (`ctx.graph`)
    `capture_task` as npu_fused_infer_attention_score.out(..., workspace=, out=[out, lse])
    with a workspace from _npu_fused_infer_attention_score_get_max_workspace (same
    arguments); the graph re-issues it with the hints' current lengths before every replay.
    """
    why = _attention_guard(q, k_cache, v_cache, block_table, mask)
    if why:
        return _reference("attention", why, q, k_cache, v_cache, block_table, mask, scale, ctx)
    b, t, heads, dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    kv_len = mask.shape[-1]
    hints = _checked_hints(ctx.hints if ctx is not None else None, b, t, kv_len)
    kind = "explicit" if hints is None else hints.kind
    if kind == "causal" and t == 1:
        kind = "prefix"                         # one query per row: causal = every key before it

    needed = sum(-(-n // block_size) for n in (hints.kv_lengths if hints else [kv_len] * b))
    if not _paged_block_size_ok(block_size, t):
        why = (f"block_size {block_size} is not a multiple of 128 in [128, 512] (Q_S > 1)" if t > 1 else
               f"block_size {block_size} is not a multiple of 16 up to 512 (Q_S == 1)")
    elif kv_heads * dim > 65535:
        why = f"KV_N * D = {kv_heads * dim} > 65535 for the [blocks, block_size, H] cache layout"
    elif needed > num_blocks:
        why = f"the rows need {needed} blocks, more than the cache's {num_blocks}"
    if why:
        _note_gather(why)
        rows = block_table.reshape(-1)
        key = k_cache.index_select(0, rows).view(b, -1, kv_heads, dim)[:, :kv_len].contiguous()
        value = v_cache.index_select(0, rows).view(b, -1, kv_heads, dim)[:, :kv_len].contiguous()
        table, paged_block = None, 0
    else:
        _modes["paged"] = _modes.get("paged", 0) + 1
        key = k_cache.view(num_blocks, block_size, kv_heads * dim)
        value = v_cache.view(num_blocks, block_size, kv_heads * dim)
        table = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
        table, paged_block = table.contiguous(), block_size

    if kind == "explicit":
        atten_mask, sparse_mode = (~mask).contiguous(), 0
    elif kind == "causal":
        atten_mask, sparse_mode = _causal_mask(q.device), 3
    else:
        atten_mask, sparse_mode = None, 0
    query = q.contiguous()

    def kv_lengths() -> list[int]:
        """Read at every launch: a graph's re-issue sees the hints as updated for that replay."""
        if hints is None:
            return [kv_len] * b
        if max(hints.kv_lengths) > kv_len:
            raise ValueError(f"attention hints {hints}: kv_lengths past the {kv_len} keys this call was built for")
        return list(hints.kv_lengths)

    def q_lengths() -> list[int] | None:
        if kind != "causal":
            return None
        if hints.query_lengths is None:
            return [t] * b
        if max(hints.query_lengths) > t:
            raise ValueError(f"attention hints {hints}: query_lengths past the {t} query tokens")
        return list(hints.query_lengths)

    if not torch.npu.is_current_stream_capturing():
        out, _lse = torch_npu.npu_fused_infer_attention_score(
            query, key, value, atten_mask=atten_mask, actual_seq_lengths=q_lengths(),
            actual_seq_lengths_kv=kv_lengths(), block_table=table, num_heads=heads, scale=float(scale),
            input_layout="BSND", num_key_value_heads=kv_heads, sparse_mode=sparse_mode,
            inner_precise=INNER_PRECISE, block_size=paged_block)
        return out

    graph = ctx.graph if ctx is not None else None
    if graph is None:
        raise RuntimeError("attention captured without its graph in the forward context (ForwardContext.graph): "
                           "the fused kernel's sequence lengths are host values that NpuGraph must refresh "
                           "before each replay")
    workspace = torch_npu._npu_fused_infer_attention_score_get_max_workspace(
        query, key, value, atten_mask=atten_mask, actual_seq_lengths=q_lengths(),
        actual_seq_lengths_kv=kv_lengths(), block_table=table, num_heads=heads, scale=float(scale),
        input_layout="BSND", num_key_value_heads=kv_heads, sparse_mode=sparse_mode,
        inner_precise=INNER_PRECISE, block_size=paged_block)
    out = torch.empty_like(query)
    lse = torch.empty(1, dtype=torch.float32, device=query.device)  # softmax_lse_flag=False: a [1] zero tensor

    def launch():
        return torch_npu.npu_fused_infer_attention_score.out(
            query, key, value, atten_mask=atten_mask, actual_seq_lengths=q_lengths(),
            actual_seq_lengths_kv=kv_lengths(), block_table=table, num_heads=heads, scale=float(scale),
            input_layout="BSND", num_key_value_heads=kv_heads, sparse_mode=sparse_mode,
            inner_precise=INNER_PRECISE, block_size=paged_block, workspace=workspace, out=[out, lse])

    graph.capture_task(launch)
    return out


def _note_gather(why: str) -> None:
    _modes["gathered"] = _modes.get("gathered", 0) + 1
    if why not in _gather_reasons:
        _gather_reasons.add(why)
        logger.warning("ops: attention on the NPU gathers K/V out of the paged cache before "
                       "npu_fused_infer_attention_score (paged form unusable: %s); an engine kv_block_size "
                       "of 128 avoids it", why)


_gather_reasons: set[str] = set()
