"""One sequential step of DSpark's Markov head and confidence head.

The drafter's block backbone gives base logits for every slot at once; the Markov head
then adds a low-rank first-order transition bias that depends on the token drafted at the
previous slot, so slots are processed one at a time with sampling in between (paper
Eq. 4-5, 7; DeepSpec `VanillaMarkov.sample_block_tokens`). This op is the maths of one
slot; the loop and the sampling stay in `ascend_dspark.drafters.dspark`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import dispatching


@dispatching("markov_confidence_step")
def markov_confidence_step(base_logits: torch.Tensor, prev_tokens: torch.Tensor, hidden: torch.Tensor,
                           markov_w1: torch.Tensor | None = None, markov_w2: torch.Tensor | None = None,
                           conf_weight: torch.Tensor | None = None, conf_bias: torch.Tensor | None = None,
                           conf_with_markov: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(corrected logits float32 [B, V], confidence float32 [B] or None) for one slot k.

    base_logits [B, V]: the target's head on the drafter hidden state h_k.
    prev_tokens [B] int64: the token at slot k-1 (the anchor for k = 0).
    hidden      [B, H]: h_k (only read by the confidence head).
    markov_w1   [V, r] (an Embedding weight) and markov_w2 [V, r] (a Linear(r, V) weight),
                or both None: no Markov head, the logits are base_logits in float32.
                    e = w1[prev];  logits = base + float32(e @ w2.T)   (matmul in w2's dtype)
    conf_weight [1, H (+ r)] and conf_bias [1] or None (a Linear(., 1)); conf_weight None: no confidence.
                    c = sigmoid([h ; e] @ w.T + b) in float32, P(x_k accepted | x_<k accepted);
                `[h ; e]` only when conf_with_markov (and a Markov head exists), else h.
    """
    logits = base_logits.float()
    emb = None
    if markov_w1 is not None:
        emb = F.embedding(prev_tokens.long(), markov_w1)
        logits = logits + F.linear(emb, markov_w2).float()
    confidence = None
    if conf_weight is not None:
        feat = torch.cat([hidden, emb.to(hidden.dtype)], dim=-1) if conf_with_markov and emb is not None else hidden
        bias = None if conf_bias is None else conf_bias.float()
        confidence = torch.sigmoid(F.linear(feat.float(), conf_weight.float(), bias)).squeeze(-1)
    return logits, confidence
