"""TEST DOUBLE, not torch_npu: CPU reference kernels behind the REAL torch_npu op schemas (newest release;
an older release's differing schemas in a namespace of their own, `register(..., namespace=)`).

Why: binding errors are the cheapest NPU bugs to catch and the ones a hand-written fake
hides. `register()` defines the exact schema strings scraped from the wheel (the committed
snapshot) with `torch.library`, so `torch.ops.npu.<op>(...)` rejects a wrong keyword,
positional use of a keyword-only argument, or a missing argument exactly as the real
dispatcher does. Behind each schema sits a plain-torch kernel that follows the semantics
documented for the op (torch_npu `_op_plugin_docs.py`, meta kernels, shared/reference/
ascend.md): RMSNorm outputs (y, rstd fp32), swiglu = silu(first half) * second half,
FIA masks where atten_mask is True/1, npu_top_k_top_p's sort/cumsum recipe, etc.

Features the double does not implement raise NotImplementedError naming the argument.
Documented A2/A3 hardware limits (head_dim 64/128 for rope, fp16/bf16 FIA and KV-cache
scatter, fp16/bf16/fp32 norms / swiglu / rotary_mul with gamma / r1 / r2 of the input's
dtype, FIA's B/N/D limits and inner_precise per branch, contiguous inputs, int32 top-k ...)
raise ValueError/TypeError while ENFORCE_HW_CONSTRAINTS is True, so CPU tests do not pass
code that the hardware would reject.

As strict as the chip, and stricter where the chip would silently corrupt:
- the SoC of the installed runtime decides what exists: every op here is an Atlas A2/A3
  kernel and raises RuntimeError on other SoCs (910 first generation, 310P, 310B, 950);
- npu_scatter_pa_kv_cache rejects duplicate rows in slot_mapping (the kernel does not say
  which write lands) and out-of-range rows; FIA's page attention rejects block ids past
  the cache in the blocks a row reads (the kernel does not check them);
- every op also has a Meta kernel running the launch-time checks (binding, dtypes, shapes,
  layouts, limits) without the data checks above: an NPU graph capture in the double
  executes nothing (fake_npu_runtime), as on the device, but still rejects what the host
  side of the real op would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ENFORCE_HW_CONSTRAINTS = True
_INT_MAX = 2147483647
_LIBS: dict[str, torch.library.Library] = {}
_DATA_CHECKS = True    # off while a Meta kernel runs an op on placeholder data


def _soc_check(op: str) -> None:
    """The pinned ops are Atlas A2/A3 kernels (op-plugin docs); other SoCs do not have them."""
    from . import fake_npu_runtime

    version, name, _bf16, fused = fake_npu_runtime.soc()
    if not fused:
        raise RuntimeError(f"{op} is not available on {name} (SoC {version}): the op-plugin documents it for "
                           "Atlas A2/A3 only (fake_torch_npu SoC rules)")


def _hw(ok: bool, message: str, exc: type[Exception] = ValueError) -> None:
    if ENFORCE_HW_CONSTRAINTS and not ok:
        raise exc(f"torch_npu on Atlas A2/A3: {message} (fake_torch_npu.ENFORCE_HW_CONSTRAINTS)")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_HALVES = (torch.float16, torch.bfloat16)


def _dtypes(op: str, allowed, **tensors: torch.Tensor) -> None:
    """The documented A2/A3 dtype list of an op's tensor inputs (TypeError, like the binder)."""
    for name, t in tensors.items():
        _hw(t.dtype in allowed, f"{op}: {name} must be {'/'.join(str(d)[6:] for d in allowed)}, got {t.dtype}",
            TypeError)


def _unsupported(op: str, arg: str, why: str = "") -> None:
    raise NotImplementedError(f"{op}: argument {arg!r} is not implemented by the fake_torch_npu test double"
                              + (f" ({why})" if why else ""))


# -- norms / activation / rope ---------------------------------------------------------
def _rms(x: torch.Tensor, gamma: torch.Tensor, epsilon: float):
    if tuple(x.shape[x.dim() - gamma.dim():]) != tuple(gamma.shape):
        raise ValueError(f"gamma shape {tuple(gamma.shape)} must match the last dims of input {tuple(x.shape)}")
    dims = tuple(range(-gamma.dim(), 0))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)  # fp32, (..., 1): the meta shape
    return xf * rstd * gamma.float(), rstd


def npu_rms_norm(input, gamma, epsilon=1e-06):
    """Input fp16/bf16/fp32, gamma of the input's dtype (op-plugin docs)."""
    _soc_check("npu_rms_norm")
    _hw(input.dim() >= 2, f"npu_rms_norm: input must have at least 2 dims, got {input.dim()}")
    _dtypes("npu_rms_norm", _FLOATS, input=input)
    _hw(gamma.dtype == input.dtype, f"npu_rms_norm: gamma dtype {gamma.dtype} != input dtype {input.dtype}", TypeError)
    y, rstd = _rms(input, gamma, epsilon)
    return y.to(input.dtype), rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """(y, rstd, x1 + x2): the sum is the new residual."""
    _soc_check("npu_add_rms_norm")
    _hw(x1.dim() >= 2, f"npu_add_rms_norm: inputs must have at least 2 dims, got {x1.dim()}")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} must have the same shape")
    _dtypes("npu_add_rms_norm", _FLOATS, x1=x1)
    _hw(x2.dtype == x1.dtype and gamma.dtype == x1.dtype,
        f"npu_add_rms_norm: x1/x2/gamma dtypes differ ({x1.dtype}, {x2.dtype}, {gamma.dtype})", TypeError)
    summed = x1.float() + x2.float()
    y, rstd = _rms(summed, gamma, epsilon)
    return y.to(x1.dtype), rstd, summed.to(x1.dtype)


def npu_swiglu(input, dim=-1):
    """silu(A) * B where A, B are the first and second halves of `input` along `dim`."""
    _soc_check("npu_swiglu")
    if input.shape[dim] % 2:
        raise ValueError(f"npu_swiglu: size {input.shape[dim]} of dim {dim} must be even")
    _dtypes("npu_swiglu", _FLOATS, input=input)
    _hw(input.is_contiguous(), "npu_swiglu: input must be contiguous")
    a, b = input.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(input.dtype)


def _rotate(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    if mode == "interleave":
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    raise ValueError(f"rotary_mode must be 'half' or 'interleave', got {mode!r}")


def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):
    """input * r1 + rotate(input) * r2, with r1 = cos and r2 = sin broadcast against input.

    A2/A3 (jit_compile=False): 4-D input and r1/r2 of one float dtype, D even and < 896,
    r1/r2 broadcastable to the input (11SD/B1SD/BNSD for BNSD, 1S1D/BS1D/BSND for BSND ...).
    """
    _soc_check("npu_rotary_mul")
    if rotate is not None:
        _unsupported("npu_rotary_mul", "rotate")
    _dtypes("npu_rotary_mul", _FLOATS, input=input)
    _hw(r1.dtype == input.dtype and r2.dtype == input.dtype, "npu_rotary_mul: r1/r2 dtype != input dtype", TypeError)
    _hw(input.dim() == 4 and r1.dim() == 4 and r2.shape == r1.shape,
        f"npu_rotary_mul needs 4-D input/r1/r2, got {tuple(input.shape)} / {tuple(r1.shape)} / {tuple(r2.shape)}")
    _hw(input.shape[-1] % 2 == 0 and input.shape[-1] < 896,
        f"npu_rotary_mul needs D even and < 896, got {input.shape[-1]}")
    _hw(r1.shape[-1] == input.shape[-1] and all(a in (1, b) for a, b in zip(r1.shape, input.shape)),
        f"npu_rotary_mul: r1 {tuple(r1.shape)} does not broadcast to input {tuple(input.shape)}")
    xf = input.float()
    return (xf * r1.float() + _rotate(xf, rotary_mode) * r2.float()).to(input.dtype)


def npu_apply_rotary_pos_emb(query, key, cos, sin, layout="BSND", rotary_mode="half"):
    """Rotates query and key IN PLACE (BSND: (B,S,N,D), cos/sin (B,S,1,D); TND: (T,N,D))."""
    _soc_check("npu_apply_rotary_pos_emb")
    dims = {"BSND": 4, "TND": 3}.get(layout)
    if dims is None:
        _unsupported("npu_apply_rotary_pos_emb", "layout", f"{layout!r}; A2/A3 support BSND and TND")
    _hw(rotary_mode == "half", f"npu_apply_rotary_pos_emb supports rotary_mode='half' only, got {rotary_mode!r}")
    for name, t in (("query", query), ("key", key), ("cos", cos), ("sin", sin)):
        if t.dim() != dims:
            raise ValueError(f"npu_apply_rotary_pos_emb: {name} must be {dims}-D for layout {layout}, got {tuple(t.shape)}")
        _hw(t.dtype == query.dtype, f"npu_apply_rotary_pos_emb: {name} dtype {t.dtype} != query dtype {query.dtype}",
            TypeError)
    _hw(query.shape[-1] in (64, 128), f"npu_apply_rotary_pos_emb needs head_dim 64 or 128, got {query.shape[-1]}")
    if cos.shape[-2] != 1 or sin.shape != cos.shape:
        raise ValueError(f"npu_apply_rotary_pos_emb: cos/sin must have N == 1 and equal shapes, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    lead = dims - 2
    if query.shape[:lead] != key.shape[:lead] or cos.shape[:lead] != query.shape[:lead]:
        raise ValueError("npu_apply_rotary_pos_emb: query, key, cos and sin must share the leading (B, S) / (T) dims")
    for t in (query, key):
        t.copy_(npu_rotary_mul(t, cos, sin, rotary_mode))
    return query, key


# -- attention -------------------------------------------------------------------------
_FIA_UNSUPPORTED_TENSORS = (
    "pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
    "antiquant_scale", "antiquant_offset", "key_antiquant_scale", "key_antiquant_offset",
    "value_antiquant_scale", "value_antiquant_offset", "query_padding_size",
    "kv_padding_size", "key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len",
    "query_rope", "key_rope", "key_rope_antiquant_scale",
)
_FIA_UNSUPPORTED_INTS = ("antiquant_mode", "key_antiquant_mode", "value_antiquant_mode")


def _per_batch(lengths, batch: int, limit: int, name: str) -> torch.Tensor:
    """FIA's rule: one value is broadcast, otherwise the first `batch` values are used."""
    values = list(lengths)
    if len(values) == 1:
        values = values * batch
    elif len(values) < batch:
        raise ValueError(f"{name} has {len(values)} entries, need 1 or >= batch ({batch})")
    values = values[:batch]
    if any(v < 0 or v > limit for v in values):
        raise ValueError(f"{name} values must lie in [0, {limit}], got {values}")
    return torch.tensor(values)


def _to_bsnd(t: torch.Tensor, layout: str, heads: int, name: str) -> torch.Tensor:
    if layout == "BSH":
        if t.dim() != 3 or t.shape[-1] % heads:
            raise ValueError(f"{name}: BSH needs (B, S, H) with H divisible by {heads}, got {tuple(t.shape)}")
        return t.unflatten(-1, (heads, -1))
    if t.dim() != 4:
        raise ValueError(f"{name}: {layout} needs a 4-D tensor, got {tuple(t.shape)}")
    t = t if layout == "BSND" else t.transpose(1, 2)
    if t.shape[2] != heads:
        raise ValueError(f"{name}: N axis is {t.shape[2]} but the head count argument says {heads}")
    return t


def _user_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int, min_kv: int | None = None) -> torch.Tensor:
    """atten_mask (True/1 = masked out) -> bool (B or 1, 1, Q_S, KV_S); S dims may be padded.

    With page attention (`min_kv` = maxBlockNumPerSeq * block_size) the mask's KV_S must be at
    least min_kv; keys past the mask count as masked."""
    if mask.dtype not in (torch.bool, torch.int8, torch.uint8):
        raise TypeError(f"atten_mask must be bool, int8 or uint8 (1 = masked), got {mask.dtype}")
    m = mask.bool()
    if m.dim() == 2:
        m = m[:, None, None, :] if q_len == 1 else m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    need_kv = kv_len if min_kv is None else min_kv
    if m.dim() != 4 or m.shape[0] not in (1, batch) or m.shape[1] != 1 \
            or m.shape[2] < q_len or m.shape[3] < need_kv:
        raise ValueError(f"atten_mask shape {tuple(mask.shape)} does not fit batch={batch}, Q_S={q_len}, "
                         f"KV_S={need_kv}")
    if m.shape[3] < kv_len:
        m = torch.cat([m, m.new_ones(*m.shape[:3], kv_len - m.shape[3])], dim=-1)
    return m[..., :q_len, :kv_len]


def _causal(mask, sparse_mode: int, q_lens, kv_lens, q_len: int, kv_len: int) -> torch.Tensor:
    if mask is None or tuple(mask.shape)[-2:] != (2048, 2048) or mask.dim() > 4 or \
            any(d != 1 for d in mask.shape[:-2]):
        raise ValueError(f"sparse_mode={sparse_mode} needs the compressed (2048, 2048) atten_mask")
    if _DATA_CHECKS and not torch.equal(mask.reshape(2048, 2048).bool(),
                                        torch.ones(2048, 2048, dtype=torch.bool).triu(1)):
        raise ValueError(f"sparse_mode={sparse_mode} expects atten_mask = triu(ones(2048, 2048), diagonal=1)")
    i = torch.arange(q_len)[None, :, None]
    j = torch.arange(kv_len)[None, None, :]
    shift = (kv_lens - q_lens)[:, None, None] if sparse_mode == 3 else 0  # 3 = rightDownCausal
    return (j > i + shift)[:, None]


def _paged_kv(op: str, key, value, kw, batch: int, q_len: int, layout: str, kv_heads: int):
    """Page attention: each row's K/V gathered through block_table into (B, nb * block_size, N, D).

    Documented rules (A2/A3): block_table int32 2-D with B rows and >= maxBlockNumPerSeq
    columns; actual_seq_lengths_kv mandatory; block_size a multiple of 128 in [128, 512] for
    Q_S > 1, a multiple of 16 up to 512 for Q_S == 1 (fp16/bf16); key/value
    (blocknum, block_size, H) for every query layout, (blocknum, KV_N, block_size, D) only for
    BNSD/TND queries; KV_N * D <= 65535 in the first form; blocknum >= the blocks all rows
    need together. Block ids are not checked by the kernel: the double checks the ones read.
    """
    table, block_size = kw["block_table"], kw.get("block_size", 0)
    if table.dtype != torch.int32:
        raise TypeError(f"{op}: block_table must be int32, got {table.dtype}")
    if table.dim() != 2 or table.shape[0] != batch:
        raise ValueError(f"{op}: block_table must be 2-D with B={batch} rows, got {tuple(table.shape)}")
    if kw.get("actual_seq_lengths_kv") is None:
        raise ValueError(f"{op}: page attention needs actual_seq_lengths_kv")
    if q_len > 1:
        _hw(block_size % 128 == 0 and 128 <= block_size <= 512,
            f"page attention with Q_S > 1 needs block_size a multiple of 128 in [128, 512], got {block_size}")
    else:
        _hw(block_size % 16 == 0 and 0 < block_size <= 512,
            f"page attention with Q_S == 1 needs block_size a multiple of 16 up to 512, got {block_size}")
    if key.shape != value.shape:
        raise ValueError(f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape")
    if key.dim() == 3:
        if key.shape[1] != block_size or key.shape[2] % kv_heads:
            raise ValueError(f"{op}: paged key must be (blocknum, {block_size}, KV_N * D), got {tuple(key.shape)}")
        _hw(key.shape[2] <= 65535, f"{op}: KV_N * D = {key.shape[2]} > 65535 for the (blocknum, blocksize, H) layout")
        k_blocks, v_blocks = (t.unflatten(-1, (kv_heads, -1)) for t in (key, value))   # (nb, bs, N, D)
    elif key.dim() == 4:
        _hw(layout in ("BNSD", "TND"), f"{op}: (blocknum, KV_N, blocksize, D) caches need a BNSD/TND query, "
            f"not {layout}")
        if key.shape[1] != kv_heads or key.shape[2] != block_size:
            raise ValueError(f"{op}: paged key must be (blocknum, {kv_heads}, {block_size}, D), got {tuple(key.shape)}")
        k_blocks, v_blocks = (t.transpose(1, 2) for t in (key, value))
    else:
        raise ValueError(f"{op}: paged key/value must be 3-D or 4-D, got {tuple(key.shape)}")
    max_kv = table.shape[1] * block_size
    kv_lens = _per_batch(kw["actual_seq_lengths_kv"], batch, max_kv, "actual_seq_lengths_kv")
    blocks = (kv_lens + block_size - 1) // block_size
    if int(blocks.sum()) > key.shape[0]:
        raise ValueError(f"{op}: the rows need {int(blocks.sum())} blocks but key has {key.shape[0]}")
    ids = table.long()
    if _DATA_CHECKS:
        used = torch.arange(table.shape[1])[None, :] < blocks[:, None]
        bad = used & ((ids < 0) | (ids >= key.shape[0]))
        if bad.any():
            raise ValueError(f"{op}: block_table reads block ids outside [0, {key.shape[0]}) "
                             f"(rows {sorted(set(bad.nonzero()[:, 0].tolist()))})")
    ids = ids.clamp(0, key.shape[0] - 1)     # unread entries (past a row's blocks) may hold anything
    k = k_blocks[ids].flatten(1, 2)          # (B, nb * bs, N, D)
    v = v_blocks[ids].flatten(1, 2)
    return k, v, int(blocks.max()) * block_size


def npu_fused_infer_attention_score(query, key, value, **kw):
    """Reference FIA for BSH/BSND/BNSD/BNSD_BSND, sparse_mode 0-3, GQA, page attention; no quant."""
    op = "npu_fused_infer_attention_score"
    _soc_check(op)
    for name in _FIA_UNSUPPORTED_TENSORS:
        if kw.get(name) is not None:
            _unsupported(op, name)
    for name in _FIA_UNSUPPORTED_INTS:
        if kw.get(name, 0):
            _unsupported(op, name)
    layout = kw.get("input_layout", "BSH")
    if layout not in ("BSH", "BSND", "BNSD", "BNSD_BSND"):
        _unsupported(op, "input_layout", repr(layout))
    heads = kw.get("num_heads", 1)
    kv_heads = kw.get("num_key_value_heads", 0) or heads
    if heads <= 0 or heads % kv_heads:
        raise ValueError(f"num_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})")
    _hw(heads // kv_heads <= 64, "num_heads / num_key_value_heads must be <= 64")
    if query.dtype == torch.int8:
        _unsupported(op, "query", "int8 (quantized) attention")
    _hw(query.dtype in (torch.float16, torch.bfloat16), f"query must be float16 or bfloat16, got {query.dtype}",
        TypeError)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _hw(t.is_contiguous(), f"{name} must be contiguous")
        _hw(t.dtype == query.dtype, f"{name} dtype {t.dtype} != query dtype {query.dtype}", TypeError)

    in_layout = "BNSD" if layout == "BNSD_BSND" else layout
    q = _to_bsnd(query, in_layout, heads, "query")
    mask_min_kv = None
    if kw.get("block_table") is not None:
        k, v, mask_min_kv = _paged_kv(op, key, value, kw, q.shape[0], q.shape[1], in_layout, kv_heads)
    else:
        if kw.get("block_size", 0):
            raise ValueError(f"{op}: block_size without block_table")
        k = _to_bsnd(key, in_layout, kv_heads, "key")
        v = _to_bsnd(value, in_layout, kv_heads, "value")
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if layout == "BNSD_BSND":
        _hw(q_len > 1, "input_layout BNSD_BSND needs Q_S > 1")
    dim = q.shape[-1]
    _hw(batch <= 65536 and heads <= 256 and dim <= 512, f"B <= 65536, N <= 256, D <= 512: got {batch}, {heads}, {dim}")
    if q_len > 1:
        _hw(dim % 16 == 0, f"Q_S > 1 with float16/bfloat16 needs D % 16 == 0, got {dim}")
    else:
        _hw(kw.get("inner_precise", 0) in (0, 1), "Q_S == 1 supports inner_precise 0 and 1 only")
        _hw(kv_len <= 262144, f"Q_S == 1 supports KV_S <= 262144, got {kv_len}")
    q_lens = torch.full((batch,), q_len)
    if kw.get("actual_seq_lengths") is not None and q_len > 1:  # ignored when Q_S == 1
        q_lens = _per_batch(kw["actual_seq_lengths"], batch, q_len, "actual_seq_lengths")
    kv_lens = torch.full((batch,), kv_len)
    if kw.get("actual_seq_lengths_kv") is not None:
        kv_lens = _per_batch(kw["actual_seq_lengths_kv"], batch, kv_len, "actual_seq_lengths_kv")

    masked = (torch.arange(kv_len)[None, :] >= kv_lens[:, None])[:, None, None, :]  # (B,1,1,KV_S)
    sparse_mode, mask = kw.get("sparse_mode", 0), kw.get("atten_mask")
    if sparse_mode in (0, 1) or q_len == 1:   # Q_S == 1 (no rope): sparse_mode has no effect
        if mask is not None:
            masked = masked | _user_mask(mask, batch, q_len, kv_len, mask_min_kv)
        elif sparse_mode == 1:
            raise ValueError("sparse_mode=1 (allMask) needs atten_mask")
    elif sparse_mode in (2, 3):
        masked = masked | _causal(mask, sparse_mode, q_lens, kv_lens, q_len, kv_len)
    else:
        _unsupported(op, "sparse_mode", f"{sparse_mode}; the double implements 0-3")

    if mask is not None:
        _hw(mask.is_contiguous(), "atten_mask must be contiguous")
    qf = q.float().transpose(1, 2)  # (B, N, Q_S, D)
    kf = k.float().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * kw.get("scale", 1.0)
    scores = scores.masked_fill(masked, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf on fully masked rows
    in_length = torch.arange(q_len)[None, None, :, None] < q_lens[:, None, None, None]
    valid_row = torch.isfinite(lse) & in_length
    probs = torch.where(valid_row, torch.softmax(scores, dim=-1), 0.0)
    out = probs @ vf  # padding rows (past actual_seq_lengths) come out as zeros
    if kw.get("inner_precise", 0) not in (2, 3):
        # Without invalid-row correction the chip leaves a fully masked row undefined: NaN
        # here, so a caller that feeds one shows up at once.
        out = out.masked_fill(~torch.isfinite(lse) & in_length, float("nan"))
    if in_layout == "BNSD" and layout != "BNSD_BSND":
        attn = out
    else:
        attn = out.transpose(1, 2)
        attn = attn.flatten(-2) if layout == "BSH" else attn
    attn = attn.to(query.dtype).contiguous()
    lse_out = lse if kw.get("softmax_lse_flag", False) else torch.zeros(1)
    return attn, lse_out.float()


def npu_fused_infer_attention_score_out(query, key, value, **kw):
    """The graph-capture form: writes into out=[attention_out, softmax_lse]."""
    out = kw.pop("out")
    kw.pop("workspace", None)
    if len(out) != 2:
        raise ValueError(f"out must be [attention_out, softmax_lse], got {len(out)} tensors")
    attn, lse = npu_fused_infer_attention_score(query, key, value, **kw)
    if out[0].shape != attn.shape or out[0].dtype != attn.dtype:
        raise ValueError(f"out[0] is {tuple(out[0].shape)}/{out[0].dtype}, the result is {tuple(attn.shape)}/{attn.dtype}")
    out[0].copy_(attn)
    if out[1].shape == lse.shape:
        out[1].copy_(lse)
    return out[0], out[1]


def npu_fused_infer_attention_score_get_max_workspace(query, key, value, **kw):
    """An opaque workspace tensor; its size means nothing in the double (the arguments are
    checked as the attention call would check them)."""
    npu_fused_infer_attention_score(query, key, value, **kw)
    return torch.empty(1, dtype=torch.uint8)


# -- KV cache / sampling ---------------------------------------------------------------
def npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None,
                            compress_seq_offsets=None, seq_lens=None, cache_mode="PA_NZ"):
    """ND caches only (cache_mode='Norm'): cache.view(blocks*block_size, N, D)[slot] = token.

    Every slot must be distinct and in range: the kernel checks neither (duplicate slots
    leave an unspecified winner), the double raises."""
    op = "npu_scatter_pa_kv_cache"
    _soc_check(op)
    for name, val in (("compress_lens", compress_lens), ("compress_seq_offsets", compress_seq_offsets),
                      ("seq_lens", seq_lens)):
        if val is not None:
            _unsupported(op, name)
    if cache_mode not in (None, "Norm"):
        _unsupported(op, "cache_mode", f"{cache_mode!r} means NZ-format caches (the default!); "
                                       "pass cache_mode='Norm' for ND caches")
    if key.dim() != 3 or value.dim() != 3:
        _unsupported(op, "key", "4-D (compressed) key/value")
    if key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError("key_cache and value_cache must be 4-D (num_blocks, block_size, N, D)")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        _hw(t.is_contiguous(), f"{op}: {name} must be contiguous")
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        _hw(t.dtype == key.dtype, f"{op}: {name} dtype {t.dtype} != key dtype {key.dtype}", TypeError)
    _dtypes(op, (*_HALVES, torch.int8), key=key)  # A2/A3; float32 is 950-only
    n_slots = key_cache.shape[0] * key_cache.shape[1]
    slots = slot_mapping.reshape(-1).long()
    if slots.numel() != key.shape[0] or key.shape[:2] != value.shape[:2]:
        raise ValueError(f"{op}: need one slot per token: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)}")
    if _DATA_CHECKS and slots.numel() and (slots.min() < 0 or slots.max() >= n_slots):
        raise ValueError(f"{op}: slot_mapping values must lie in [0, {n_slots - 1}] (no -1 padding slots)")
    if _DATA_CHECKS and slots.unique().numel() != slots.numel():
        dup = sorted({int(x) for x, n in zip(*slots.unique(return_counts=True)) if n > 1})
        raise ValueError(f"{op}: duplicate slots {dup[:8]} in slot_mapping: the kernel does not define which "
                         "write lands (give every padding token its own scratch row)")
    key_cache.view(n_slots, *key_cache.shape[2:]).index_copy_(0, slots, key)
    value_cache.view(n_slots, *value_cache.shape[2:]).index_copy_(0, slots, value)


def npu_top_k_top_p(logits, p=None, k=None):
    """The documented recipe: ascending stable sort, top-k threshold, then top-p on the rest."""
    _soc_check("npu_top_k_top_p")
    if p is None and k is None:
        raise ValueError("npu_top_k_top_p: p and k cannot both be None")
    _hw(logits.dim() == 2, f"logits must be 2-D, got {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    values, order = torch.sort(logits, dim=-1, descending=False, stable=True)
    if k is not None:
        _hw(k.dtype == torch.int32, f"k must be int32, got {k.dtype}", TypeError)
        if _DATA_CHECKS:
            _hw(bool(((k >= 1) & (k <= min(1024, vocab))).all()), "k values must lie in [1, min(1024, vocab)]")
        threshold = values.gather(-1, (vocab - k.long().clamp(1, vocab)).unsqueeze(-1))
        values = values.masked_fill(values < threshold, float("-inf"))
    if p is not None:
        _hw(p.dtype == logits.dtype, f"p dtype {p.dtype} != logits dtype {logits.dtype}", TypeError)
        cumulative = torch.softmax(values.float(), dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - p.float().unsqueeze(-1)
        drop[..., -1] = False
        values = values.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, values)


IMPLS = {
    "npu_rms_norm": npu_rms_norm,
    "npu_add_rms_norm": npu_add_rms_norm,
    "npu_swiglu": npu_swiglu,
    "npu_rotary_mul": npu_rotary_mul,
    "npu_apply_rotary_pos_emb": npu_apply_rotary_pos_emb,
    "npu_fused_infer_attention_score": npu_fused_infer_attention_score,
    "npu_fused_infer_attention_score.out": npu_fused_infer_attention_score_out,
    "_npu_fused_infer_attention_score_get_max_workspace": npu_fused_infer_attention_score_get_max_workspace,
    "npu_scatter_pa_kv_cache": npu_scatter_pa_kv_cache,
    "npu_top_k_top_p": npu_top_k_top_p,
}


def register(schemas: dict[str, str], namespace: str = "npu") -> None:
    """Define the snapshot schemas under torch.ops.<namespace> with their CPU kernels (once per
    process and namespace). "npu" holds the newest release's; an older release's schemas that
    differ from those go into a namespace of their own (fake_torch_npu.install(release=...)).

    A namespace stays registered after uninstall: a torch.library namespace cannot be
    re-defined, and without the fake torch_npu module nothing reaches it.
    """
    if namespace in _LIBS:
        return
    missing = sorted(set(schemas) - set(IMPLS))
    if missing:
        raise KeyError(f"the snapshot pins ops the double has no kernel for: {missing}")
    lib = torch.library.Library(namespace, "DEF")
    for name in sorted(schemas):
        lib.define(schemas[name])
    for name in sorted(schemas):
        impl = _required_tensors(IMPLS[name], schemas[name])
        lib.impl(name, impl, "CPU")
        lib.impl(name, _meta_kernel(impl), "Meta")
    _LIBS[namespace] = lib


def _required_tensors(impl, schema: str):
    """The dispatcher lets None through for a non-optional `Tensor` argument (an undefined
    tensor reaches the kernel); torch_npu's kernels do not take one. Refuse it, naming the
    argument, as e.g. torch_npu 2.6.0's npu_top_k_top_p(Tensor logits, Tensor p, Tensor k) needs."""
    import inspect

    from ops.backends.npu_schema import parse_arguments

    required = [a.name for a in parse_arguments(schema).values() if a.type == "Tensor"]
    signature = inspect.signature(impl)
    op = schema.split("(", 1)[0]

    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name in required:
            if name in bound.arguments and bound.arguments[name] is None:
                raise RuntimeError(f"{op}: argument {name!r} is a required Tensor in this schema, got None "
                                   f"({schema})")
        return impl(*args, **kwargs)

    return checked


def _placeholder(value):
    """A zero CPU tensor with a meta tensor's shape, strides and dtype (lists mapped through)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype).zero_()
    if isinstance(value, (list, tuple)):
        return type(value)(_placeholder(v) for v in value)
    return value


def _as_meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_as_meta(v) for v in value)
    return value


def _meta_kernel(impl):
    """What the host side of the real op does at launch (and in a graph capture, where the
    device runs nothing): bind, check dtypes / shapes / layouts / limits, infer the output
    shapes. Runs the CPU kernel on zero placeholders with the data checks off."""
    def meta(*args, **kwargs):
        global _DATA_CHECKS
        saved, _DATA_CHECKS = _DATA_CHECKS, False
        try:
            out = impl(*_placeholder(args), **{k: _placeholder(v) for k, v in kwargs.items()})
        finally:
            _DATA_CHECKS = saved
        return _as_meta(out)
    return meta
