"""DSpark drafter: anchor-first block backbone + Markov head + confidence head.

Sequential stage (paper Eq. 4-6; DeepSpec `markov_head.py`), prev_0 = anchor, s_0 = 0:
    logits_k, z_k, s_k = markov_head_step(prev_k, h_k, target.logits(h_k), s_{k-1})
    q_k      = sampling.probs(logits_k)                   (temperature / top-k / top-p / min-p)
    x_k      = sampling.sample(q_k, anchor_pos + 1 + k, Stream.DRAFT);  prev_{k+1} = x_k
q_k is the exact distribution x_k was drawn from, which lossless verification needs. At
T = 0 (every row greedy) q_k is the one-hot of argmax(logits_k) and x_k its index, which
`ops.markov_greedy_step` gives without materialising logits_k. The
head type (`markov_head_type`: vanilla, gated, rnn) only changes the bias inside the op;
the RNN head carries its state s_k across the block.
Confidence (Eq. 7): c_k = sigmoid(z_k), z_k = proj([h_k ; markov_w1[prev_k]]) in float32
(without the Markov part when `confidence_head_with_markov` is False), whatever the head
type: P(x_k accepted | x_<k accepted). It depends on x_{k-1} but not on x_k. Only the
requested `num_tokens` steps run.

Training (`sequential_terms`) runs the same op over the block with teacher-forced previous
tokens, differentiably, so a trained head is the one propose runs. The heads below hold
the weights under DeepSpec's names (`markov_head.markov_w{1,2}.weight`,
`markov_head.gate_proj.*`, `markov_head.joint_proj.*`, `confidence_head.proj.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from ascend_dspark.spec.sampling import SamplingBatch, Stream
from ops.context import ForwardContext
from ops.markov import markov_head_step

from .base import DraftProposal
from .block_backbone import BlockDrafter
from .config import DrafterConfig


class MarkovHead(nn.Module):
    """Weights of the transition bias: W1 [V, r] (Embedding), W2 Linear(r, V), plus
    `gate_proj` Linear(H + r, r) for the gated head or `joint_proj` Linear(2r + H, 3r)
    (gate, candidate, output) for the RNN head. The maths is `ops.markov.markov_head_step`."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, head_type: str = "vanilla") -> None:
        super().__init__()
        self.head_type = head_type
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)
        if head_type == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif head_type == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)
        elif head_type != "vanilla":
            raise ValueError(f"unknown markov_head_type {head_type!r}")

    def weights(self) -> dict[str, torch.Tensor]:
        out = dict(markov_w1=self.markov_w1.weight, markov_w2=self.markov_w2.weight)
        if self.head_type == "gated":
            out.update(gate_weight=self.gate_proj.weight, gate_bias=self.gate_proj.bias)
        elif self.head_type == "rnn":
            out.update(joint_weight=self.joint_proj.weight, joint_bias=self.joint_proj.bias)
        return out


class ConfidenceHead(nn.Module):
    """Weights of the confidence head sigmoid(proj(.)). The maths is `ops.markov.markov_head_step`."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_size, 1, bias=True)


class DSparkDrafter(BlockDrafter):
    kind = "dspark"

    def __init__(self, cfg: DrafterConfig, target: nn.Module) -> None:
        super().__init__(cfg, target)
        if cfg.markov_rank > 0:
            self.markov_head = MarkovHead(cfg.vocab_size, cfg.markov_rank, cfg.hidden_size, cfg.markov_head_type)
        if cfg.confidence_head:
            self.confidence_head = ConfidenceHead(cfg.confidence_input_size)
        self._conf_with_markov = cfg.confidence_head_with_markov and cfg.markov_rank > 0

    def _head_weights(self) -> dict:
        """Keyword arguments of `markov_head_step` for this drafter's heads."""
        weights: dict = dict(conf_with_markov=self._conf_with_markov)
        if self.config.markov_rank > 0:
            weights.update(self.markov_head.weights())
        if self.config.confidence_head:
            weights.update(conf_weight=self.confidence_head.proj.weight, conf_bias=self.confidence_head.proj.bias)
        return weights

    def sample_drafts(self, h: torch.Tensor, anchors: torch.Tensor, anchor_positions: torch.Tensor,
                      sampling: SamplingBatch, ctx: ForwardContext | None = None) -> DraftProposal:
        registry = (ctx or ForwardContext()).ops
        base = self.logits(h, registry)                              # [B, K, V] float32
        weights = self._head_weights()
        prev, state = anchors.long(), None
        # At T = 0 a slot yields only its token and one-hot: `markov_greedy_step` writes the
        # one-hot straight into the proposal's probabilities (no corrected logits, no stack).
        greedy = sampling.all_greedy
        one_hots = torch.empty(base.shape, dtype=torch.float32, device=base.device) if greedy else None
        tokens, probs, conf = [], [], []
        for k in range(h.shape[1]):
            if greedy:
                x, z, state = registry.markov_greedy_step(prev, h[:, k], base[:, k], state, one_hots[:, k], **weights)
            else:
                logits, z, state = registry.markov_head_step(prev, h[:, k], base[:, k], state, **weights)
                q, x = sampling.draw(logits, anchor_positions + 1 + k, Stream.DRAFT)
                probs.append(q)
            if z is not None:
                conf.append(z)
            tokens.append(x.long())
            prev = tokens[-1]
        return DraftProposal(tokens=torch.stack(tokens, 1), probs=one_hots if greedy else torch.stack(probs, 1),
                             confidence=torch.sigmoid(torch.stack(conf, 1)) if conf else None)

    def sequential_terms(self, hidden: torch.Tensor,
                         prev_tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Teacher-forced sequential-stage terms for training, differentiable (no no_grad).

        hidden [N, K, H]: the backbone outputs h_k of K block slots (`draft_hidden`).
        prev_tokens [N, K] int64: prev_tokens[:, 0] is the anchor, prev_tokens[:, k] the
            (ground-truth) token at slot k-1.
        Returns (bias [N, K, V] float32, to add to the base logits target.logits(h), or None
        without a Markov head; confidence logit [N, K] float32 before the sigmoid, or None
        without a confidence head). The RNN head unrolls its state over K from s_0 = 0.
        It runs the very op `propose` runs, slot by slot, so feeding propose's own drafts
        as prev_tokens reproduces its logits and confidences exactly.
        """
        if hidden.dim() != 3 or prev_tokens.shape != hidden.shape[:2] or hidden.shape[1] == 0:
            raise ValueError(f"sequential_terms: hidden {list(hidden.shape)} must be [N, K >= 1, H] and prev_tokens "
                             f"{list(prev_tokens.shape)} must be [N, K]")
        weights = self._head_weights()
        biases, confs, state = [], [], None
        for k in range(hidden.shape[1]):
            bias, z, state = markov_head_step(prev_tokens[:, k], hidden[:, k], None, state, **weights)
            if bias is not None:
                biases.append(bias)
            if z is not None:
                confs.append(z)
        return (torch.stack(biases, 1) if biases else None), (torch.stack(confs, 1) if confs else None)
