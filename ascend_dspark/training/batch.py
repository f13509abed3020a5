"""What one training step sees: token ids, the response mask and the target's outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TargetBatch:
    input_ids: torch.Tensor     # [B, T] long, right-padded
    loss_mask: torch.Tensor     # [B, T] bool: True on response tokens (what the target generated)
    lengths: torch.Tensor       # [B] long
    features: torch.Tensor      # [B, T, m*H]: outputs of the drafter's target layers, concatenated
    last_hidden: torch.Tensor   # [B, T, H]: the target's final-normed hidden; target.logits() of it
                                # at position i is the target's distribution of token i+1


@torch.no_grad()
def target_outputs(target, input_ids: torch.Tensor, lengths: torch.Tensor, layer_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, T, m*H], last_hidden [B, T, H]) of the frozen target over right-padded
    rows, computed online through a scratch KV cache sized for this batch (no_grad, not
    inference_mode: the drafter's graph keeps these tensors as inputs)."""
    from ascend_dspark.engine.kv_cache import KVCache

    cfg = target.config
    b, t = input_ids.shape
    dtype = next(target.parameters()).dtype
    cache = KVCache(cfg.num_layers, b, t, cfg.num_kv_heads, cfg.head_dim, dtype, input_ids.device)
    positions = torch.arange(t, device=input_ids.device).expand(b, t)
    valid = positions < lengths.unsqueeze(1)
    slots = torch.arange(b, device=input_ids.device)
    out = target(input_ids, positions, cache, slots, valid, tuple(layer_ids))
    return out.features, out.hidden
