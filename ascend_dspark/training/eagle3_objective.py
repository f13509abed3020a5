"""Training-time test (TTT) of the EAGLE-3 drafter, unrolled L steps over whole sequences.

Index t of step j stands for the draft made j steps after observing position t:
- step 0 pairs the target feature of position t with the token x_{t+1} (what `observe`
  does), at RoPE position t;
- step j >= 1 pairs the draft's own pre-norm output of step j-1 at index t with the
  ground-truth token x_{t+1+j}, at RoPE position t+j (what `propose` does with its draft);
- every step's output predicts x_{t+2+j}, against the target's distribution at position
  t+1+j, each step a mean soft cross-entropy, summed with weights 0.8^j (EAGLE-3 / SpecForge).
Attention matches inference exactly: the query of step j at index t sees the step-0 keys of
indices <= t (the observed context) and its own scratch keys of steps 1..j at index t
(positions t+1..t+j), nothing else.

A position is supervised at step j when x_{t+1} (the anchor) and x_{t+2}..x_{t+2+j} are
all response tokens: the drafts of a chain exist only while the chain stays inside the
response.
"""

from __future__ import annotations

import torch

from ascend_dspark.drafters.eagle3 import Eagle3Drafter

from . import losses
from .batch import TargetBatch


def ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float
                  ) -> torch.Tensor:
    """q [B, T, Hq, D]; keys/values[i] [B, T, Hkv, D] of step i. Causal over step 0, diagonal
    (same index) over steps 1..j. Returns [B, T, Hq, D]."""
    rep = q.shape[2] // keys[0].shape[2]
    ks = [k.repeat_interleave(rep, dim=2).to(q.dtype) for k in keys]
    vs = [v.repeat_interleave(rep, dim=2).to(q.dtype) for v in values]
    t = q.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores0 = torch.einsum("bthd,bshd->bhts", q, ks[0]) * scale
    scores0 = scores0.masked_fill(~causal, float("-inf"))
    diag = [torch.einsum("bthd,bthd->bht", q, k).unsqueeze(-1) * scale for k in ks[1:]]
    probs = torch.softmax(torch.cat([scores0, *diag], dim=-1).float(), dim=-1).to(q.dtype)
    out = torch.einsum("bhts,bshd->bthd", probs[..., :t], vs[0])
    for i, v in enumerate(vs[1:]):
        out = out + probs[..., t + i].transpose(1, 2).unsqueeze(-1) * v
    return out


def ttt_unroll(drafter: Eagle3Drafter, features: torch.Tensor, input_ids: torch.Tensor, ttt_length: int):
    """Yield (j, h_j [B, T, H]) for j = 0..ttt_length-1: the pre-norm output of TTT step j at
    every index t, which predicts the token at t+2+j (teacher-forced tokens x_{t+1+j})."""
    b, t = input_ids.shape
    index = torch.arange(t, device=input_ids.device)
    layer = drafter.layers[0]
    attn = layer.self_attn
    hidden = drafter.fc(features.to(drafter.dtype))
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for j in range(ttt_length):
        tokens = input_ids[:, (index + 1 + j).clamp(max=t - 1)]
        x = torch.cat([layer.input_layernorm(drafter.embed(tokens)), layer.hidden_norm(hidden)], dim=-1)
        cos, sin = drafter.rotary((index + j).expand(b, t), x.dtype)
        q = attn.query(x, cos, sin)
        k, v = attn.key_value(x, cos, sin)
        keys.append(k)
        values.append(v)
        h = hidden + attn.o_proj(ttt_attention(q, keys, values, attn.scale).reshape(b, t, -1))
        hidden = h + layer.mlp(layer.post_attention_layernorm(h))
        yield j, hidden


def eagle3_objective(drafter: Eagle3Drafter, batch: TargetBatch, ttt_length: int
                     ) -> tuple[dict[str, losses.Term], dict[str, torch.Tensor]]:
    ids, mask = batch.input_ids, batch.loss_mask
    b, t = ids.shape
    dev = ids.device
    index = torch.arange(t, device=dev)

    def response_at(offset: int) -> torch.Tensor:
        """Whether position t + offset exists and holds a response token, [B, T]."""
        pos = index + offset
        return mask[:, pos.clamp(max=t - 1)] & (pos < t)

    chain_ok = response_at(1)                       # the anchor x_{t+1} is a response token
    terms: dict[str, losses.Term] = {}
    accepts, valids = [], []
    for j, hidden in ttt_unroll(drafter, batch.features, ids, ttt_length):
        chain_ok = chain_ok & response_at(2 + j)
        rows = chain_ok.nonzero(as_tuple=True)
        logits = drafter.logits(drafter.norm(hidden[rows]))                 # [N, V] float32
        with torch.no_grad():
            target_hidden = batch.last_hidden[rows[0], rows[1] + 1 + j]
            p_target = torch.softmax(drafter.target.logits(target_hidden), dim=-1)
        terms[f"ttt{j}"] = losses.soft_cross_entropy(logits, p_target, torch.ones(logits.shape[0], device=dev))
        with torch.no_grad():
            full = torch.zeros(b, t, device=dev)
            full[rows] = 1 - losses.l1_distance(torch.softmax(logits, -1), p_target) / 2
        accepts.append(full)
        valids.append(chain_ok)
    accept = torch.stack(accepts, -1).flatten(0, 1)
    valid = torch.stack(valids, -1).flatten(0, 1).float()
    per_step = (accept * valid).sum(0) / valid.sum(0).clamp(min=1)
    metrics = {f"accept@{k + 1}": per_step[k] for k in range(ttt_length)}
    metrics["tau_prob"] = losses.expected_accepted_length(accept, valid)
    return terms, metrics


def eagle3_loss_weights(ttt_length: int, step_decay: float) -> dict[str, float]:
    """Step j's mean soft cross-entropy counts step_decay^j (EAGLE-3: 0.8^j)."""
    return {f"ttt{j}": step_decay ** j for j in range(ttt_length)}
