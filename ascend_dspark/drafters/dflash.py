"""DFlash drafter: the parallel block backbone, drafts sampled independently per slot.

Two layouts (shared/specs/checkpoint-formats.md §2.5):
- fill-in (z-lab DFlash, our random-init default): B slots, slot k >= 1 predicts position
  anchor_pos + k, so B - 1 drafts;
- anchor-first (DeepSpec's DFlash = `Qwen3DSparkModel` with markov_rank 0): slot k predicts
  anchor_pos + 1 + k, B drafts.
Each draft k is drawn from `sampling.probs(target.logits(h_k))` with `Stream.DRAFT` noise at
its absolute position anchor_pos + 1 + k.
"""

from __future__ import annotations

import torch

from ascend_dspark.spec.sampling import SamplingBatch, Stream
from ops.context import ForwardContext

from .base import DraftProposal
from .block_backbone import BlockDrafter


class DFlashDrafter(BlockDrafter):
    kind = "dflash"

    def sample_drafts(self, h: torch.Tensor, anchors: torch.Tensor, anchor_positions: torch.Tensor,
                      sampling: SamplingBatch, ctx: ForwardContext | None = None) -> DraftProposal:
        positions = anchor_positions.unsqueeze(1) + 1 + torch.arange(h.shape[1], device=anchors.device)
        probs, tokens = sampling.draw(self.logits(h, (ctx or ForwardContext()).ops), positions, Stream.DRAFT)
        return DraftProposal(tokens=tokens.long(), probs=probs, confidence=None)
