"""DSpark's vanilla Markov step and confidence logit in one launch per draft position.

Why: the Markov head is sequential (slot k's bias needs the token drafted at k - 1), so a
DSpark proposal runs it K times between sampling steps. In torch one slot is an embedding
gather, a [B, r] x [r, V] matmul, casts, the add to the base logits, and the confidence
head's concatenation, casts and dot: about ten launches per slot, seventy at K = 7, which
made a DSpark step cost ~1.2x a DFlash step (BENCHMARKS.md). Here one program per (row,
V tile) gathers e = W1[prev] (r <= 256 values), forms W2 e for its tile in fp32, rounds it
to W2's dtype as the reference's matmul does, and adds the base logits; the first tile of
each row also writes the confidence logit [h ; e] . w + b in fp32.

The gated and RNN heads (and autograd) run the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, floats, needs_autograd, next_pow2

BLOCK_V = 512
MAX_RANK = 256
MAX_CONF_INPUT = 16384


@triton.jit
def _markov_step_kernel(prev_ptr, w1_ptr, w2_ptr, base_ptr, logits_ptr, hidden_ptr, cw_ptr, cb_ptr, conf_ptr,
                        V, R, H, s_w1, s_w2, s_base, s_logits, s_hidden,
                        HAS_CONF: tl.constexpr, CONF_WITH_E: tl.constexpr, HAS_CONF_BIAS: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(0)
    prev = tl.load(prev_ptr + row).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    e = tl.load(w1_ptr + prev * s_w1 + r, mask=r_ok, other=0.0)
    v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = v < V
    w2 = tl.load(w2_ptr + v.to(tl.int64)[:, None] * s_w2 + r[None, :], mask=v_ok[:, None] & r_ok[None, :], other=0.0)
    bias = tl.sum(w2.to(tl.float32) * e.to(tl.float32)[None, :], axis=1)
    bias = bias.to(w2_ptr.dtype.element_ty).to(tl.float32)
    base = tl.load(base_ptr + row * s_base + v, mask=v_ok, other=0.0)
    tl.store(logits_ptr + row * s_logits + v, base + bias, mask=v_ok)
    if HAS_CONF:
        if tile == 0:
            h_idx = tl.arange(0, BLOCK_H)
            h_ok = h_idx < H
            h = tl.load(hidden_ptr + row * s_hidden + h_idx, mask=h_ok, other=0.0)
            z = tl.sum(h.to(tl.float32) * tl.load(cw_ptr + h_idx, mask=h_ok, other=0.0).to(tl.float32), axis=0)
            if CONF_WITH_E:
                e_h = e.to(hidden_ptr.dtype.element_ty).to(tl.float32)       # cat([h, e.to(h.dtype)])
                z += tl.sum(e_h * tl.load(cw_ptr + H + r, mask=r_ok, other=0.0).to(tl.float32), axis=0)
            if HAS_CONF_BIAS:
                z += tl.load(cb_ptr).to(tl.float32)
            tl.store(conf_ptr + row, z)


def markov_head_step(prev_tokens, hidden, base_logits=None, state=None, *, markov_w1=None, markov_w2=None,
                     gate_weight=None, gate_bias=None, joint_weight=None, joint_bias=None,
                     conf_weight=None, conf_bias=None, conf_with_markov=True):
    """`ops.markov_head_step` for the vanilla head with base logits (inference); anything
    else runs the reference."""
    from ops.markov import markov_head_step as ref

    args = (prev_tokens, hidden, base_logits, state)
    kwargs = dict(markov_w1=markov_w1, markov_w2=markov_w2, gate_weight=gate_weight, gate_bias=gate_bias,
                  joint_weight=joint_weight, joint_bias=joint_bias, conf_weight=conf_weight, conf_bias=conf_bias,
                  conf_with_markov=conf_with_markov)
    tensors = [t for t in (hidden, base_logits, markov_w1, markov_w2, conf_weight, conf_bias) if t is not None]
    if (markov_w1 is None or base_logits is None or gate_weight is not None or joint_weight is not None
            or base_logits.dtype != torch.float32 or base_logits.stride(-1) != 1 or hidden.stride(-1) != 1
            or markov_w1.stride(-1) != 1 or markov_w2.stride(-1) != 1 or markov_w1.shape[1] > MAX_RANK
            or markov_w2.shape[1] != markov_w1.shape[1] or hidden.dim() != 2 or base_logits.dim() != 2
            or (conf_weight is not None and (not conf_weight.is_contiguous()
                                             or conf_weight.shape[-1] > MAX_CONF_INPUT))
            or not floats(*tensors) or needs_autograd(*tensors)):
        return ref.reference(*args, **kwargs)
    bsz, vocab = base_logits.shape
    rank, width = markov_w1.shape[1], hidden.shape[1]
    with_e = conf_weight is not None and conf_with_markov
    if conf_weight is not None and conf_weight.shape[-1] != width + (rank if with_e else 0):
        return ref.reference(*args, **kwargs)            # the reference raises the shape error
    logits = torch.empty(bsz, vocab, dtype=torch.float32, device=base_logits.device)
    conf = torch.empty(bsz, dtype=torch.float32, device=base_logits.device) if conf_weight is not None else None
    if bsz == 0:
        return logits, conf, None
    prev = prev_tokens.contiguous()
    dummy = logits
    with device_guard(base_logits):
        _markov_step_kernel[(triton.cdiv(vocab, BLOCK_V), bsz)](
            prev, markov_w1, markov_w2, base_logits, logits, hidden,
            conf_weight if conf_weight is not None else dummy, conf_bias if conf_bias is not None else dummy,
            conf if conf is not None else dummy, vocab, rank, width,
            markov_w1.stride(0), markov_w2.stride(0), base_logits.stride(0), logits.stride(0), hidden.stride(0),
            HAS_CONF=conf_weight is not None, CONF_WITH_E=with_e, HAS_CONF_BIAS=conf_bias is not None,
            BLOCK_V=BLOCK_V, BLOCK_R=max(next_pow2(rank), 16), BLOCK_H=next_pow2(width), num_warps=4)
    return logits, conf, None
