"""Tensor parallelism of a loaded decoder: each rank keeps its shard of every weight.

    q/k/v (merged)   column-parallel by KV head: rank r keeps a contiguous run of KV heads and
                     the query heads that attend to them, so attention never crosses ranks and
                     the paged KV cache of a rank holds only its heads;
    o_proj           row-parallel over the same heads: partial sums, added across ranks;
    gate/up (merged) column-parallel over the intermediate features; down_proj row-parallel;
    embedding        vocabulary-parallel: a rank looks up the ids in its rows, zeros elsewhere,
                     and the ranks' vectors are summed (exact: one non-zero term per entry);
    LM head          vocabulary-parallel; the logits are gathered whole on every rank before
                     sampling (`DecoderModel.logits`).

Heads that do not divide by the group size are split unevenly (`split_sizes`): SmolLM2-135M
has 3 KV heads (9 query heads), so at TP=2 rank 0 keeps 2 KV heads (6 query heads) and rank 1
keeps 1 (3). Row-parallel partial sums all have the full hidden size whatever the split, so an
uneven split costs no padding and no replicated KV; it only leaves rank 1 less to do. A group
larger than the KV heads would have to replicate KV heads (vLLM's way); it is refused instead,
naming the sizes that work. The sum's order and why it is a gather: distributed/group.py.

Why TP=2 is not bit-identical to TP=1 (measured on the CPU, float32, SmolLM2), and what is:
column-parallel slices keep each output's dot product as it was (bit-identical), attention
never crosses ranks, and the vocabulary-parallel embedding adds exact zeros. The row-parallel
sums are where it differs. The CPU's sgemm accumulates the inner dimension in blocks of 384
in sequence, so a split on a block boundary reproduces one process's sum exactly for
multi-row products (o_proj at TP=2: 384 + 192 of 576), but down_proj's 768 + 768 of 1536 adds
(b0 + b1) + (b2 + b3) where one process adds ((b0 + b1) + b2) + b3, and a one-row product
runs through gemv, whose order differs again. The result: max |logit difference| 4.6e-5
against top-two gaps of 0.02 and more on the tests' prompts, so greedy tokens agree, but
a near-tie could resolve differently from TP=1. What is guaranteed is that every rank agrees
bit for bit (the ordered sum, distributed/group.py), so the group never diverges. Matching
TP=1 bit for bit would take all-gathering the row-parallel inputs and replicating o_proj
and down_proj on every rank (a third of the weights), which defeats sharding; no backend's
reduction order (all-reduce, reduce-scatter) reproduces a single matmul's either.

The model is loaded whole on every rank and then sliced (`shard_target`), after the drafter
has been built against the whole target (a draft's checkpoint is checked against the target's
embedding and LM head). The drafter stays replicated: it calls `embed` and `logits`, which
are collectives here, identically on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from ascend_dspark.distributed import TensorParallelGroup, split_sizes
from ops.registry import OpRegistry


def row_parallel(registry: OpRegistry, x: torch.Tensor, linear: nn.Linear, tp: TensorParallelGroup | None) -> torch.Tensor:
    """`linear(x)` where `linear` holds this rank's input columns: the ranks' partial products
    summed, then the bias (kept whole, added once)."""
    if tp is None:
        return registry.linear(x, linear.weight, linear.bias)
    out = tp.sum_partials(registry.linear(x, linear.weight))
    return out if linear.bias is None else out + linear.bias


def valid_sizes(num_kv_heads: int) -> str:
    return f"1..{num_kv_heads}"


def shard_target(model: nn.Module, tp: TensorParallelGroup) -> None:
    """Slice a loaded DecoderModel in place to rank `tp.rank`'s shard (see the module docstring)."""
    cfg = model.config
    if tp.size > cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp.size} exceeds this model's {cfg.num_kv_heads} KV heads "
                         f"({cfg.model_type}): KV heads are split across ranks, not replicated; "
                         f"valid sizes are {valid_sizes(cfg.num_kv_heads)}")
    group = cfg.num_heads // cfg.num_kv_heads
    kv_sizes = split_sizes(cfg.num_kv_heads, tp.size)
    k0 = sum(kv_sizes[:tp.rank])
    nk = kv_sizes[tp.rank]
    ffn_sizes = split_sizes(cfg.intermediate_size, tp.size)
    f0, nf = sum(ffn_sizes[:tp.rank]), ffn_sizes[tp.rank]
    hd = cfg.head_dim
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q_rows = range(k0 * group * hd, (k0 + nk) * group * hd)
        kv_rows = range(k0 * hd, (k0 + nk) * hd)
        q_len, kv_len = cfg.num_heads * hd, cfg.num_kv_heads * hd
        _keep_rows(attn.qkv_proj, [(0, q_rows), (q_len, kv_rows), (q_len + kv_len, kv_rows)],
                   {"q_proj": nk * group * hd, "k_proj": nk * hd, "v_proj": nk * hd})
        _keep_columns(attn.o_proj, q_rows)
        ffn = range(f0, f0 + nf)
        _keep_rows(mlp.gate_up_proj, [(0, ffn), (cfg.intermediate_size, ffn)], {"gate_proj": nf, "up_proj": nf})
        _keep_columns(mlp.down_proj, ffn)
        attn.tp = mlp.tp = tp
    per_rank = -(-cfg.vocab_size // tp.size)
    start = tp.rank * per_rank
    model.model.embed_tokens.weight = _vocab_shard(model.model.embed_tokens.weight, start, per_rank)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.weight = _vocab_shard(model.lm_head.weight, start, per_rank)
    model.vocab_start, model.num_local_kv_heads, model.tp = start, nk, tp


def _keep_rows(merged: nn.Module, pieces: list[tuple[int, range]], parts: dict[str, int]) -> None:
    """Keep the rows `offset + r` of each piece of a MergedLinear (weight and bias)."""
    index = torch.tensor([offset + r for offset, rows in pieces for r in rows], device=merged.weight.device)
    merged.weight = nn.Parameter(merged.weight.index_select(0, index).contiguous(), requires_grad=False)
    if merged.bias is not None:
        merged.bias = nn.Parameter(merged.bias.index_select(0, index).contiguous(), requires_grad=False)
    merged.parts = dict(parts)


def _keep_columns(linear: nn.Linear, columns: range) -> None:
    linear.weight = nn.Parameter(linear.weight[:, columns.start:columns.stop].contiguous(), requires_grad=False)
    linear.in_features = len(columns)


def _vocab_shard(weight: torch.Tensor, start: int, rows: int) -> nn.Parameter:
    """Rows start..start+rows of an embedding-shaped matrix, zero-padded past the vocabulary
    (every rank then holds the same number of rows, as the logits' all-gather wants)."""
    shard = weight.new_zeros(rows, weight.shape[1])
    piece = weight[start:start + rows]
    shard[:piece.shape[0]] = piece
    return nn.Parameter(shard, requires_grad=False)
