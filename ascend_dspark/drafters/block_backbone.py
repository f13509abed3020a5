"""The DFlash-style parallel block backbone shared by DFlash and DSpark.

Context (observe): `c = hidden_norm(fc(features))`; in every draft layer the context K/V are
`k_norm(k_proj(c))` with RoPE at the context positions and `v_proj(c)` (no input_layernorm on
c, c is the same input for every layer), written into the drafter's paged cache.

Block (propose): `[anchor, mask x (B-1)]` at positions anchor_pos..anchor_pos+B-1, embedded
with the target's embedding. Each layer is a pre-norm Qwen3 layer whose block K/V are
written at the block positions; every block query sees the cached context < anchor_pos and
all B block keys (bidirectional: kv_limit = anchor_pos + B for every block query). The block
K/V are scratch: the slot length stays at anchor_pos and the next `observe` overwrites them.
Output `h = norm(x)` [B, B_slots, H].

Layouts: `anchor_first` (DSpark, DeepSpec's DFlash): slot k predicts position anchor_pos+1+k,
B drafts. Fill-in (z-lab DFlash): slot k >= 1 predicts anchor_pos+k, B-1 drafts.

`propose` is the same up to the hidden states of the draft slots for both drafters; only
how drafts are drawn from them (`sample_drafts`) differs: independently per slot (DFlash)
or through the Markov head, slot after slot (DSpark).
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from ascend_dspark.spec.sampling import SamplingBatch
from ops.context import ForwardContext

from .base import Drafter, DraftProposal
from .config import DrafterConfig
from .layers import GatedMLP, RMSNorm, SelfAttention


class BlockLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg, cfg.hidden_size)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, meta, mask) -> torch.Tensor:
        reg = meta.ctx.ops
        attn = self.self_attn(self.input_layernorm(x, reg), cos, sin, k_cache, v_cache, meta, mask)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x, reg), reg)


class BlockDrafter(Drafter):
    """fc + hidden_norm + `layers.{i}` + norm, with DeepSpec's parameter names (no prefix)."""

    def __init__(self, cfg: DrafterConfig, target: nn.Module) -> None:
        super().__init__(cfg, target)
        m = len(cfg.target_layer_ids)
        self.fc = nn.Linear(m * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(BlockLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def lookahead(self) -> int:
        return self.config.block_size

    @torch.no_grad()
    def observe(self, slot_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                next_tokens: torch.Tensor, counts: torch.Tensor, ctx: ForwardContext | None = None) -> None:
        """Write the context K/V of positions[b, :counts[b]] (next_tokens are not needed here)."""
        cache = self._require_cache()
        self._check_features(features)
        reg = (ctx or ForwardContext()).ops
        c = self.hidden_norm(self.fc(features.to(self.dtype)), reg)
        t = features.shape[1]
        valid = torch.arange(t, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)
        cos, sin = self.rotary(positions, c.dtype)
        rows = cache.tables.slot_mapping(slot_ids, positions, valid)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.key_value(c, cos, sin, reg)
            reg.kv_write(cache.k[i], cache.v[i], k, v, rows)
        self._commit_lengths(slot_ids, positions, counts)

    def block_hidden(self, slot_ids: torch.Tensor, anchors: torch.Tensor, anchor_positions: torch.Tensor,
                     ctx: ForwardContext | None = None) -> torch.Tensor:
        """Run the block `[anchor, mask x (B-1)]`; returns h = norm(x) of all B slots, [B, B_slots, H]."""
        cache = self._require_cache()
        b, n = anchors.shape[0], self.block_size
        offsets = torch.arange(n, device=anchors.device)
        ids = torch.full((b, n), self.config.mask_token_id, dtype=torch.long, device=anchors.device)
        ids[:, 0] = anchors
        positions = anchor_positions.unsqueeze(1) + offsets
        valid = torch.ones_like(positions, dtype=torch.bool)
        x = self.embed(ids)
        cos, sin = self.rotary(positions, x.dtype)
        kv_limit = (anchor_positions + n).unsqueeze(1).expand(b, n)
        meta = cache.address(slot_ids, positions, valid, ctx)
        mask = ops.build_attention_mask(positions, kv_limit, meta.num_keys)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], meta, mask)
        return self.norm(x, meta.ctx.ops)

    def draft_hidden(self, h: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The hidden states of the slots that predict positions anchor_pos+1 .. anchor_pos+num_tokens."""
        start = 0 if self.config.anchor_first else 1
        return h[:, start:start + num_tokens]

    @torch.no_grad()
    def propose(self, slot_ids: torch.Tensor, anchors: torch.Tensor, anchor_positions: torch.Tensor,
                num_tokens: int, sampling: SamplingBatch, ctx: ForwardContext | None = None) -> DraftProposal:
        self._check_num_tokens(num_tokens)
        if num_tokens == 0:
            return self._empty_proposal(anchors)
        h = self.draft_hidden(self.block_hidden(slot_ids, anchors, anchor_positions, ctx), num_tokens)
        return self.sample_drafts(h, anchors, anchor_positions, sampling, ctx)

    def sample_drafts(self, h: torch.Tensor, anchors: torch.Tensor, anchor_positions: torch.Tensor,
                      sampling: SamplingBatch, ctx: ForwardContext | None = None) -> DraftProposal:
        """Drafts for positions anchor_pos+1 .. anchor_pos+K from the draft slots' hidden states
        h [B, K >= 1, H] (K = the requested num_tokens)."""
        raise NotImplementedError
