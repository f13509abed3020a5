"""DSpark drafter: anchor-first block backbone + Markov head + confidence head.

Sequential stage (paper Eq. 4-5; DeepSpec `VanillaMarkov.sample_block_tokens`), prev_0 = anchor:
    logits_k = target.logits(h_k) + markov_w2(markov_w1[prev_k])
    q_k      = sampling.probs(logits_k)                   (temperature / top-k / top-p / min-p)
    x_k      = sampling.sample(q_k, anchor_pos + 1 + k, Stream.DRAFT);  prev_{k+1} = x_k
q_k is the exact distribution x_k was drawn from, which lossless verification needs.
Confidence (Eq. 7): c_k = sigmoid(proj([h_k ; markov_w1[prev_k]])) in float32 (without the
Markov part when `confidence_head_with_markov` is False): P(x_k accepted | x_<k accepted).
It depends on x_{k-1} but not on x_k. Only the requested `num_tokens` steps run.
The Markov + confidence maths of one slot is the op `ops.markov_confidence_step`; the loop
and the sampling between slots stay here. The heads below hold the weights (checkpoint
names `markov_head.markov_w{1,2}.weight`, `confidence_head.proj.{weight,bias}`).
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from ascend_dspark.spec.sampling import SamplingBatch, Stream

from .base import DraftProposal
from .block_backbone import BlockDrafter
from .config import DrafterConfig


class MarkovHead(nn.Module):
    """Weights of the low-rank first-order transition bias W1[prev] @ W2: W1 [V, r]
    (Embedding), W2 Linear(r, V). The maths is `ops.markov_confidence_step`."""

    def __init__(self, vocab_size: int, rank: int) -> None:
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)


class ConfidenceHead(nn.Module):
    """Weights of the confidence head sigmoid(proj(.)). The maths is `ops.markov_confidence_step`."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_size, 1, bias=True)


class DSparkDrafter(BlockDrafter):
    kind = "dspark"

    def __init__(self, cfg: DrafterConfig, target: nn.Module) -> None:
        super().__init__(cfg, target)
        if cfg.markov_rank > 0:
            self.markov_head = MarkovHead(cfg.vocab_size, cfg.markov_rank)
        if cfg.confidence_head:
            self.confidence_head = ConfidenceHead(cfg.confidence_input_size)
        self._conf_with_markov = cfg.confidence_head_with_markov and cfg.markov_rank > 0

    @torch.no_grad()
    def propose(self, slot_ids: torch.Tensor, anchors: torch.Tensor, anchor_positions: torch.Tensor,
                num_tokens: int, sampling: SamplingBatch) -> DraftProposal:
        self._check_num_tokens(num_tokens)
        if num_tokens == 0:
            return self._empty_proposal(anchors)
        h = self.draft_hidden(self.block_hidden(slot_ids, anchors, anchor_positions), num_tokens)
        base = self.logits(h)                                        # [B, K, V] float32
        prev = anchors.long()
        markov = self.markov_head if self.config.markov_rank > 0 else None
        confidence = self.confidence_head if self.config.confidence_head else None
        weights = dict(
            markov_w1=markov.markov_w1.weight if markov is not None else None,
            markov_w2=markov.markov_w2.weight if markov is not None else None,
            conf_weight=confidence.proj.weight if confidence is not None else None,
            conf_bias=confidence.proj.bias if confidence is not None else None,
            conf_with_markov=self._conf_with_markov)
        tokens, probs, conf = [], [], []
        for k in range(num_tokens):
            logits, c = ops.markov_confidence_step(base[:, k], prev, h[:, k], **weights)
            if c is not None:
                conf.append(c)
            q = sampling.probs(logits)
            x = sampling.sample(q, anchor_positions + 1 + k, Stream.DRAFT).long()
            tokens.append(x)
            probs.append(q)
            prev = x
        return DraftProposal(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1),
                             confidence=torch.stack(conf, 1) if conf else None)
