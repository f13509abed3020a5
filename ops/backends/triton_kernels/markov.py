"""DSpark's vanilla Markov step and confidence logit in one launch per draft position.

Why: the Markov head is sequential (slot k's bias needs the token drafted at k - 1), so a
DSpark proposal runs it K times between sampling steps. In torch one slot is an embedding
gather, a [B, r] x [r, V] matmul, casts, the add to the base logits, and the confidence
head's concatenation, casts and dot: about ten launches per slot, seventy at K = 7, which
made a DSpark step cost ~1.2x a DFlash step (BENCHMARKS.md). Here one program per (row,
V tile) gathers e = W1[prev] (r <= 256 values), forms W2 e for its tile in fp32, rounds it
to W2's dtype as the reference's matmul does, and adds the base logits; the first tile of
each row also writes the confidence logit [h ; e] . w + b in fp32.

Greedy proposals (`markov_greedy_step`) need only the argmax: the same kernel then writes
each tile's (max, first index of it) instead of the logits, and `_one_hot_kernel` reduces a
row's partials in tile order and writes the one-hot and the token. Two launches per slot
where the torch path took five (step, argmax, zeros, scatter, the sample's argmax), and
torch's argmax over one 49k-wide row runs in a single thread block (~12 us on an H100).

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
                        part_max_ptr, part_idx_ptr,
                        V, R, H, s_w1, s_w2, s_base, s_logits, s_hidden,
                        HAS_CONF: tl.constexpr, CONF_WITH_E: tl.constexpr, HAS_CONF_BIAS: tl.constexpr,
                        ARGMAX: tl.constexpr,
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
    if ARGMAX:          # greedy: only this tile's (max, first index of it) leave the program
        logits = tl.where(v_ok, base + bias, float("-inf"))
        best = tl.max(logits, axis=0)
        first = tl.min(tl.where(logits == best, v, V), axis=0)
        tl.store(part_max_ptr + row * tl.num_programs(0) + tile, best)
        tl.store(part_idx_ptr + row * tl.num_programs(0) + tile, first)
    else:
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


@triton.jit
def _one_hot_kernel(part_max_ptr, part_idx_ptr, probs_ptr, tokens_ptr, V, TILES, s_probs,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Each program reduces its row's tile partials to the argmax (the largest value, the
    lowest index among equals, tiles in order), writes its V tile of the one-hot, and the
    first tile the token."""
    row = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < TILES
    part = tl.load(part_max_ptr + row * TILES + t, mask=t_ok, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * TILES + t, mask=t_ok, other=V)
    best = tl.max(part, axis=0)
    token = tl.min(tl.where(t_ok & (part == best), idx, V), axis=0)
    v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    tl.store(probs_ptr + row * s_probs + v, tl.where(v == token, 1.0, 0.0), mask=v < V)
    if tile == 0:
        tl.store(tokens_ptr + row, token.to(tl.int64))


def _fusable(prev_tokens, hidden, base_logits, markov_w1, markov_w2, gate_weight, joint_weight,
             conf_weight, conf_bias, conf_with_markov) -> bool:
    """Whether the kernel covers this call: the vanilla head on float32 base logits (inference)."""
    tensors = [t for t in (hidden, base_logits, markov_w1, markov_w2, conf_weight, conf_bias) if t is not None]
    if (markov_w1 is None or base_logits is None or gate_weight is not None or joint_weight is not None
            or base_logits.dtype != torch.float32 or base_logits.stride(-1) != 1 or hidden.stride(-1) != 1
            or markov_w1.stride(-1) != 1 or markov_w2.stride(-1) != 1 or markov_w1.shape[1] > MAX_RANK
            or markov_w2.shape[1] != markov_w1.shape[1] or hidden.dim() != 2 or base_logits.dim() != 2
            or (conf_weight is not None and (not conf_weight.is_contiguous()
                                             or conf_weight.shape[-1] > MAX_CONF_INPUT))
            or not floats(*tensors) or needs_autograd(*tensors)):
        return False
    width = hidden.shape[1] + (markov_w1.shape[1] if conf_weight is not None and conf_with_markov else 0)
    return conf_weight is None or conf_weight.shape[-1] == width      # else the reference raises the shape error


def _launch(prev_tokens, hidden, base_logits, markov_w1, markov_w2, conf_weight, conf_bias, conf_with_markov,
            logits=None, partials=None):
    """One Markov step kernel: writes `logits`, or with `partials` (max, index) per V tile;
    returns the confidence logits (or None)."""
    bsz, vocab = base_logits.shape
    rank, width = markov_w1.shape[1], hidden.shape[1]
    conf = torch.empty(bsz, dtype=torch.float32, device=base_logits.device) if conf_weight is not None else None
    if bsz == 0:
        return conf
    dummy = base_logits
    part_max, part_idx = partials if partials is not None else (dummy, dummy)
    with device_guard(base_logits):
        _markov_step_kernel[(triton.cdiv(vocab, BLOCK_V), bsz)](
            prev_tokens.contiguous(), markov_w1, markov_w2, base_logits, logits if logits is not None else dummy,
            hidden, conf_weight if conf_weight is not None else dummy, conf_bias if conf_bias is not None else dummy,
            conf if conf is not None else dummy, part_max, part_idx, vocab, rank, width,
            markov_w1.stride(0), markov_w2.stride(0), base_logits.stride(0),
            logits.stride(0) if logits is not None else 0, hidden.stride(0),
            HAS_CONF=conf_weight is not None, CONF_WITH_E=conf_weight is not None and conf_with_markov,
            HAS_CONF_BIAS=conf_bias is not None, ARGMAX=partials is not None,
            BLOCK_V=BLOCK_V, BLOCK_R=max(next_pow2(rank), 16), BLOCK_H=next_pow2(width), num_warps=4)
    return conf


def markov_head_step(prev_tokens, hidden, base_logits=None, state=None, *, markov_w1=None, markov_w2=None,
                     gate_weight=None, gate_bias=None, joint_weight=None, joint_bias=None,
                     conf_weight=None, conf_bias=None, conf_with_markov=True):
    """`ops.markov_head_step` for the vanilla head with base logits (inference); anything
    else runs the reference."""
    from ops.markov import markov_head_step as ref

    kwargs = dict(markov_w1=markov_w1, markov_w2=markov_w2, gate_weight=gate_weight, gate_bias=gate_bias,
                  joint_weight=joint_weight, joint_bias=joint_bias, conf_weight=conf_weight, conf_bias=conf_bias,
                  conf_with_markov=conf_with_markov)
    if not _fusable(prev_tokens, hidden, base_logits, markov_w1, markov_w2, gate_weight, joint_weight,
                    conf_weight, conf_bias, conf_with_markov):
        return ref.reference(prev_tokens, hidden, base_logits, state, **kwargs)
    logits = torch.empty(base_logits.shape, dtype=torch.float32, device=base_logits.device)
    conf = _launch(prev_tokens, hidden, base_logits, markov_w1, markov_w2, conf_weight, conf_bias, conf_with_markov,
                   logits=logits)
    return logits, conf, None


def markov_greedy_step(prev_tokens, hidden, base_logits, state, probs_out, *, markov_w1=None, markov_w2=None,
                       gate_weight=None, gate_bias=None, joint_weight=None, joint_bias=None,
                       conf_weight=None, conf_bias=None, conf_with_markov=True):
    """`ops.markov_greedy_step`: the Markov kernel keeps only each V tile's (max, first index),
    a second launch reduces them and writes the one-hot row and the token. Other heads, and
    outputs the kernel cannot address, run the reference."""
    from ops.markov import markov_greedy_step as ref

    kwargs = dict(markov_w1=markov_w1, markov_w2=markov_w2, gate_weight=gate_weight, gate_bias=gate_bias,
                  joint_weight=joint_weight, joint_bias=joint_bias, conf_weight=conf_weight, conf_bias=conf_bias,
                  conf_with_markov=conf_with_markov)
    if (not _fusable(prev_tokens, hidden, base_logits, markov_w1, markov_w2, gate_weight, joint_weight,
                     conf_weight, conf_bias, conf_with_markov)
            or probs_out.shape != base_logits.shape or probs_out.dtype != torch.float32 or probs_out.stride(-1) != 1):
        return ref.reference(prev_tokens, hidden, base_logits, state, probs_out, **kwargs)
    bsz, vocab = base_logits.shape
    tiles = triton.cdiv(vocab, BLOCK_V)
    dev = base_logits.device
    partials = (torch.empty(bsz, tiles, dtype=torch.float32, device=dev),
                torch.empty(bsz, tiles, dtype=torch.int32, device=dev))
    tokens = torch.empty(bsz, dtype=torch.long, device=dev)
    conf = _launch(prev_tokens, hidden, base_logits, markov_w1, markov_w2, conf_weight, conf_bias, conf_with_markov,
                   partials=partials)
    if bsz:
        with device_guard(base_logits):
            _one_hot_kernel[(tiles, bsz)](partials[0], partials[1], probs_out, tokens, vocab, tiles,
                                          probs_out.stride(0), BLOCK_T=next_pow2(tiles), BLOCK_V=BLOCK_V,
                                          num_warps=4)
    return tokens, conf, None
