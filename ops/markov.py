"""One sequential step of DSpark's Markov head (vanilla, gated or RNN) and confidence head.

The drafter's block backbone gives base logits for every slot at once; the Markov head
then adds a transition bias that depends on the token drafted at the previous slot, so
slots are processed one at a time with sampling in between (paper Eq. 4-7; DeepSpec
`deepspec/modeling/dspark/markov_head.py`). These ops are the maths of one slot k; the
loop and the sampling stay in `ascend_dspark.drafters.dspark`, and training unrolls the
same op over the block (teacher forcing), so inference and training cannot drift apart.

With e = W1[prev] (an Embedding [V, r]) and W2 a Linear(r, V) without bias, the three
heads of DeepSpec differ only in the r-vector that W2 projects:
    vanilla   u = e
    gated     u = sigmoid(gate_proj([h ; e])) * e                      (gate_proj: Linear(H + r, r))
    rnn       z = [s_{k-1} ; e ; h];  g, c, o = joint_proj(z).chunk(3)  (joint_proj: Linear(2r + H, 3r))
              s_k = g' * s_{k-1} + (1 - g') * tanh(c),  g' = sigmoid(g);   u = tanh(o)
    bias = W2 u.
The RNN bias at step k is built from z_k, i.e. from s_{k-1}, not the fresh s_k; s_0 = 0.
The confidence head sees [h ; e] (or h alone), for every head type: never the gate nor
the RNN state, exactly as DeepSpec's `predict_confidence_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import dispatching


@dispatching("markov_head_step")
def markov_head_step(prev_tokens: torch.Tensor, hidden: torch.Tensor, base_logits: torch.Tensor | None = None,
                     state: torch.Tensor | None = None, *,
                     markov_w1: torch.Tensor | None = None, markov_w2: torch.Tensor | None = None,
                     gate_weight: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                     joint_weight: torch.Tensor | None = None, joint_bias: torch.Tensor | None = None,
                     conf_weight: torch.Tensor | None = None, conf_bias: torch.Tensor | None = None,
                     conf_with_markov: bool = True,
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(logits float32 [B, V] or None, confidence logit float32 [B] or None, state [B, r] or None).

    prev_tokens [B] int64: the token at slot k-1 (the anchor for k = 0).
    hidden      [B, H]: h_k (read by the gated / RNN heads and the confidence head).
    base_logits [B, V] or None: the target's head on h_k. Given: the first output is
                base_logits + bias (the draft distribution's logits, added here so a backend
                can fuse it). None: the first output is the bias alone (training adds it).
    state       [B, r] or None: the RNN state s_{k-1} (None: s_0 = 0). Ignored by the others.
    markov_w1 / markov_w2: the Markov head, or both None: no head; then the first output is
                base_logits in float32 (or None) and no state is returned.
    gate_weight / gate_bias: present for the gated head; joint_weight / joint_bias for the
                RNN head (not both). The matmuls run in the weights' dtype, the bias is
                returned in float32.
    conf_weight [1, H (+ r)] / conf_bias [1] or None: the confidence head; the second output
                is its logit proj([h ; e]) in float32 (`[h ; e]` only when conf_with_markov
                and a Markov head exists), sigmoid of which is P(x_k accepted | x_<k accepted).
    The third output is s_k for the RNN head, else None.
    """
    if gate_weight is not None and joint_weight is not None:
        raise ValueError("markov_head_step: pass gate_* (gated head) or joint_* (RNN head), not both")
    logits = None if base_logits is None else base_logits.float()
    emb = new_state = None
    if markov_w1 is not None:
        emb = F.embedding(prev_tokens.long(), markov_w1)
        if gate_weight is not None:
            gate_in = torch.cat([hidden.to(gate_weight.dtype), emb.to(gate_weight.dtype)], dim=-1)
            latent = torch.sigmoid(F.linear(gate_in, gate_weight, gate_bias)).to(emb.dtype) * emb
        elif joint_weight is not None:
            dt = joint_weight.dtype
            prev_state = torch.zeros_like(emb, dtype=dt) if state is None else state.to(dt)
            z = torch.cat([prev_state, emb.to(dt), hidden.to(dt)], dim=-1)
            gate, candidate, output = F.linear(z, joint_weight, joint_bias).chunk(3, dim=-1)
            gate = torch.sigmoid(gate)
            new_state = gate * prev_state + (1.0 - gate) * torch.tanh(candidate)
            latent = torch.tanh(output)
        else:
            latent = emb
        bias = F.linear(latent.to(markov_w2.dtype), markov_w2).float()
        logits = bias if logits is None else logits + bias
    confidence = None
    if conf_weight is not None:
        feat = torch.cat([hidden, emb.to(hidden.dtype)], dim=-1) if conf_with_markov and emb is not None else hidden
        b = None if conf_bias is None else conf_bias.float()
        confidence = F.linear(feat.float(), conf_weight.float(), b).squeeze(-1)
    return logits, confidence, new_state


@dispatching("markov_confidence_step")
def markov_confidence_step(base_logits: torch.Tensor, prev_tokens: torch.Tensor, hidden: torch.Tensor,
                           markov_w1: torch.Tensor | None = None, markov_w2: torch.Tensor | None = None,
                           conf_weight: torch.Tensor | None = None, conf_bias: torch.Tensor | None = None,
                           conf_with_markov: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(corrected logits float32 [B, V], confidence float32 [B] or None) for one slot k of the
    vanilla head, with the confidence as a probability: `markov_head_step` without the gated /
    RNN weights, then sigmoid. Kept as the package's original vanilla entry point.

                    e = w1[prev];  logits = base + float32(e @ w2.T)   (matmul in w2's dtype)
                    c = sigmoid([h ; e] @ w.T + b) in float32
    """
    logits, z, _ = markov_head_step(prev_tokens, hidden, base_logits, markov_w1=markov_w1, markov_w2=markov_w2,
                                    conf_weight=conf_weight, conf_bias=conf_bias, conf_with_markov=conf_with_markov)
    return logits, None if z is None else torch.sigmoid(z)


@dispatching("markov_greedy_step")
def markov_greedy_step(prev_tokens: torch.Tensor, hidden: torch.Tensor, base_logits: torch.Tensor,
                       state: torch.Tensor | None, probs_out: torch.Tensor, **weights
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One slot of a greedy DSpark proposal: `markov_head_step` on base logits, then the
    argmax. Returns (token int64 [B], confidence logit float32 [B] or None, state or None) and
    writes the one-hot of the token into `probs_out` ([B, V] float32, rows may be strided: a
    slot of the proposal's [B, K, V] probabilities), which is what greedy sampling would draw
    and return (`SamplingBatch.draw`).

    Why an op of its own: at T = 0 a slot's only products are the token and its one-hot, so a
    backend need not write the corrected logits at all; the CUDA backend takes the argmax
    inside the Markov kernel (per-tile partials) and writes the one-hot in a second launch,
    two launches per slot instead of five. Ties go to the lowest index, as `torch.argmax`'s.
    `weights`: `markov_head_step`'s keyword arguments."""
    logits, confidence, new_state = markov_head_step.reference(prev_tokens, hidden, base_logits, state, **weights)
    tokens = logits.argmax(-1)
    probs_out.zero_().scatter_(-1, tokens.unsqueeze(-1), 1.0)
    return tokens, confidence, new_state
