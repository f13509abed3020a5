"""EAGLE-3 drafter in DeepSpec's `Qwen3Eagle3Model` form (checkpoint-formats §1.5, §1.10, §5.2).

`hidden = fc(features)` fuses m target layers; ONE decoder layer takes
`cat(input_layernorm(embed(token)), hidden_norm(hidden))` (width 2H) into q/k/v, keeps
`hidden` as the residual, then post-attention norm + MLP + residual. Its output h (pre-norm)
is the recurrent hidden; logits are `target.logits(norm(h))`.

Convention: draft position i pairs the feature of position i with the token at i+1, at RoPE
position i; its output predicts the token at i+2.
- observe: runs the layer causally on the observed chunk (writing the draft cache at those
  positions) and keeps the last output h per slot; after it the slot length is anchor_pos and
  h predicts the token at anchor_pos + 1.
- propose: draft 0 from the stored h; draft k >= 1 runs the layer on (h_{k-1}, draft_{k-1})
  at position anchor_pos + k - 1. Those cache writes are scratch (lengths are not touched)
  and the next observe overwrites them.
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from ops.context import ForwardContext
from ascend_dspark.spec.sampling import SamplingBatch, Stream

from .base import Drafter, DraftProposal
from .config import DrafterConfig
from .layers import GatedMLP, RMSNorm, SelfAttention


class Eagle3Layer(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = SelfAttention(cfg, 2 * h)
        self.mlp = GatedMLP(cfg)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, emb, hidden, cos, sin, k_cache, v_cache, meta, mask) -> torch.Tensor:
        reg = meta.ctx.ops
        x = torch.cat([self.input_layernorm(emb, reg), self.hidden_norm(hidden, reg)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin, k_cache, v_cache, meta, mask)
        return h + self.mlp(self.post_attention_layernorm(h, reg), reg)


class Eagle3Drafter(Drafter):
    kind = "eagle3"

    def __init__(self, cfg: DrafterConfig, target: nn.Module) -> None:
        super().__init__(cfg, target)
        m = len(cfg.target_layer_ids)
        self.fc = nn.Linear(m * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(cfg)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.last_hidden: torch.Tensor | None = None     # [num_slots, H]: pre-norm h of the last observed position

    @property
    def lookahead(self) -> int:
        return self.max_draft_tokens - 1

    def attach(self, tables, dtype: torch.dtype | None = None) -> None:
        super().attach(tables, dtype)
        self.last_hidden = torch.zeros(tables.num_seqs, self.config.hidden_size, dtype=dtype or self.dtype,
                                       device=self.cache.lengths.device)

    def reset(self, slot_ids: torch.Tensor) -> None:
        super().reset(slot_ids)
        self.last_hidden[slot_ids] = 0

    def _run_layer(self, emb: torch.Tensor, hidden: torch.Tensor, slot_ids: torch.Tensor,
                   positions: torch.Tensor, valid: torch.Tensor, ctx: ForwardContext | None) -> torch.Tensor:
        cache = self.cache
        cos, sin = self.rotary(positions, hidden.dtype)
        meta = cache.address(slot_ids, positions, valid, ctx)
        mask = ops.build_attention_mask(positions, positions + 1, meta.num_keys)   # causal
        return self.layers[0](emb, hidden, cos, sin, cache.k[0], cache.v[0], meta, mask)

    @torch.no_grad()
    def observe(self, slot_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                next_tokens: torch.Tensor, counts: torch.Tensor, ctx: ForwardContext | None = None) -> None:
        self._require_cache()
        self._check_features(features)
        t = features.shape[1]
        valid = torch.arange(t, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)
        tokens = torch.where(valid, next_tokens, torch.zeros_like(next_tokens))   # padding may hold -1
        hidden = self.fc(features.to(self.dtype))
        h = self._run_layer(self.embed(tokens), hidden, slot_ids, positions, valid, ctx)
        last = h.gather(1, (counts - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)
        keep = (counts > 0).unsqueeze(1)
        self.last_hidden[slot_ids] = torch.where(keep, last.to(self.last_hidden.dtype), self.last_hidden[slot_ids])
        self._commit_lengths(slot_ids, positions, counts)

    @torch.no_grad()
    def propose(self, slot_ids: torch.Tensor, anchors: torch.Tensor, anchor_positions: torch.Tensor,
                num_tokens: int, sampling: SamplingBatch, ctx: ForwardContext | None = None) -> DraftProposal:
        """`anchors` were already consumed by observe (as the next token of anchor_pos - 1)."""
        self._check_num_tokens(num_tokens)
        self._require_cache()
        if num_tokens == 0:
            return self._empty_proposal(anchors)
        h = self.last_hidden[slot_ids].to(self.dtype).unsqueeze(1)                  # [B, 1, H]
        valid = torch.ones(anchors.shape[0], 1, dtype=torch.bool, device=anchors.device)
        tokens, probs = [], []
        reg = (ctx or ForwardContext()).ops
        for k in range(num_tokens):
            if k > 0:
                pos = (anchor_positions + k - 1).unsqueeze(1)
                h = self._run_layer(self.embed(tokens[-1].unsqueeze(1)), h, slot_ids, pos, valid, ctx)
            q, x = sampling.draw(self.logits(self.norm(h[:, 0], reg), reg), anchor_positions + 1 + k, Stream.DRAFT)
            tokens.append(x.long())
            probs.append(q)
        return DraftProposal(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1), confidence=None)
