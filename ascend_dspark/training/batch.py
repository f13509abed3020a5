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
    from ascend_dspark.cache import PagedKVCache

    cfg = target.config
    b, t = input_ids.shape
    dtype = next(target.parameters()).dtype
    cache = PagedKVCache.contiguous(cfg.num_layers, b, t, cfg.num_kv_heads, cfg.head_dim, dtype, input_ids.device)
    positions = torch.arange(t, device=input_ids.device).expand(b, t)
    valid = positions < lengths.unsqueeze(1)
    slots = torch.arange(b, device=input_ids.device)
    out = target(input_ids, positions, cache, slots, valid, tuple(layer_ids))
    return out.features, out.hidden


class CachedTargetOutputs:
    """Target outputs read from an offline feature cache (`feature_cache.py`) instead of
    running the target: each sample's cached tokens must equal the training sample's, so a
    cache made from other data fails loudly. Keeps the last few shards in memory."""

    def __init__(self, cache, keep_shards: int = 4) -> None:
        self.cache = cache
        self.keep = keep_shards
        self._shards: dict[int, list] = {}

    def sample(self, sample_id: str, input_ids: torch.Tensor):
        shard, row = self.cache.locate(sample_id)
        if shard not in self._shards:
            if len(self._shards) >= self.keep:
                self._shards.pop(next(iter(self._shards)))
            self._shards[shard] = self.cache.read(shard)
        cached = self._shards[shard][row]
        if not torch.equal(cached.input_ids, input_ids):
            raise ValueError(f"feature cache {self.cache.dir}: sample {sample_id!r} holds other tokens than the "
                             "training data (cache made from another regen file or max_len): rebuild it")
        return cached

    def batch(self, samples, lengths: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, T, m*H], last_hidden [B, T, H]) right-padded with zeros, on `device`."""
        rows = [self.sample(s.id, s.input_ids) for s in samples]
        t = int(lengths.max())
        features = rows[0].features.new_zeros(len(rows), t, rows[0].features.shape[-1])
        hidden = rows[0].last_hidden.new_zeros(len(rows), t, rows[0].last_hidden.shape[-1])
        for b, r in enumerate(rows):
            features[b, : len(r.input_ids)] = r.features
            hidden[b, : len(r.input_ids)] = r.last_hidden
        return features.to(device), hidden.to(device)
