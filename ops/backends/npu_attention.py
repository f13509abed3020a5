"""Ascend attention: `ops.attention` as torch_npu.npu_fused_infer_attention_score over the
paged KV cache, registered for the "npu" backend (imported by ops/backends/npu.py).

The kernel takes sequence lengths as host integers; the forward context's AttentionHints
give them without a device read, and inside a graph capture the call becomes an updatable
task of the capturing graph (`ForwardContext.graph`). See `attention` for every case.
"""

from __future__ import annotations

import logging

import torch
import torch_npu

from ops.backends.npu_common import BACKEND, run_reference, unsupported_dtype
from ops.context import AttentionHints, ForwardContext
from ops.registry import register

logger = logging.getLogger("ops")
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)                 # npu_fused_infer_attention_score query
INNER_PRECISE = 0   # FIA: high precision, no invalid-row correction (see attention())
INNER_PRECISE_USER_MASK = 2     # high precision with invalid-row correction: the FIA doc's choice for Q_S > 1 with a user mask


def _attention_guard(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     mask: torch.Tensor) -> str | None:
    why = unsupported_dtype("npu_fused_infer_attention_score", q.dtype, ATTENTION_DTYPES)
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
    inner_precise=0 (high precision), or 2 (high precision with invalid-row correction) for
    Q_S > 1 with an explicit mask, as the FIA documentation asks; every query row sees at
    least one key either way. Q_S == 1 takes the kernel's incremental (IFA) branch, Q_S > 1
    the prompt (PFA) branch.

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
    arguments), shared by all the graph's attention tasks (`graph.shared_workspace`: the
    largest one asked for); the graph re-issues it with the hints' current lengths before
    every replay.
    """
    why = _attention_guard(q, k_cache, v_cache, block_table, mask)
    if why:
        return run_reference("attention", why, q, k_cache, v_cache, block_table, mask, scale, ctx)
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
    # The prompt branch (Q_S > 1) with a user mask wants invalid-row correction; the
    # incremental branch (Q_S == 1) takes 0 / 1 only. No caller hands it a fully masked row.
    precise = INNER_PRECISE_USER_MASK if kind == "explicit" and t > 1 else INNER_PRECISE
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
            inner_precise=precise, block_size=paged_block)
        return out

    graph = ctx.graph if ctx is not None else None
    if graph is None:
        raise RuntimeError("attention captured without its graph in the forward context (ForwardContext.graph): "
                           "the fused kernel's sequence lengths are host values that NpuGraph must refresh "
                           "before each replay")
    workspace = graph.shared_workspace(torch_npu._npu_fused_infer_attention_score_get_max_workspace(
        query, key, value, atten_mask=atten_mask, actual_seq_lengths=q_lengths(),
        actual_seq_lengths_kv=kv_lengths(), block_table=table, num_heads=heads, scale=float(scale),
        input_layout="BSND", num_key_value_heads=kv_heads, sparse_mode=sparse_mode,
        inner_precise=precise, block_size=paged_block))
    out = torch.empty_like(query)
    lse = torch.empty(1, dtype=torch.float32, device=query.device)  # softmax_lse_flag=False: a [1] zero tensor

    def launch(query_lengths, kv_lengths_now):
        return torch_npu.npu_fused_infer_attention_score.out(
            query, key, value, atten_mask=atten_mask, actual_seq_lengths=query_lengths,
            actual_seq_lengths_kv=kv_lengths_now, block_table=table, num_heads=heads, scale=float(scale),
            input_layout="BSND", num_key_value_heads=kv_heads, sparse_mode=sparse_mode,
            inner_precise=precise, block_size=paged_block, workspace=workspace, out=[out, lse])

    graph.capture_task(launch, lambda: (q_lengths(), kv_lengths()))
    return out


def _note_gather(why: str) -> None:
    _modes["gathered"] = _modes.get("gathered", 0) + 1
    if why not in _gather_reasons:
        _gather_reasons.add(why)
        logger.warning("ops: attention on the NPU gathers K/V out of the paged cache before "
                       "npu_fused_infer_attention_score (paged form unusable: %s); an engine kv_block_size "
                       "of 128 avoids it", why)


_gather_reasons: set[str] = set()
