"""Training forward and losses of the block drafters (DFlash, DSpark), DeepSpec's recipe.

One sequence of length T gives its context once (`c = hidden_norm(fc(features))`) and A
randomly chosen anchors. Each anchor a forms a block `[x_a, mask x (n-1)]` at positions
a..a+n-1 whose queries see the context keys at positions < a and the keys of their own
block (bidirectional), exactly what `BlockDrafter.block_hidden` sees at inference with the
anchor's context cached: the target has not yet run on the anchor, so its features are
not visible. All blocks of a batch run as one attention over [context ; blocks].

Draft slot k predicts the token at a+1+k, against the target's distribution at position
a+k (its next-token distribution, T=1). Slots are supervised while their labels form a
contiguous run of response tokens starting at the anchor (DeepSpec's cumprod of the loss
mask), weighted exp(-k / decay).

Losses (DeepSpec `dspark/loss.py`): DSpark = 0.1 CE + 0.9 ||q - p||_1 + 1.0 BCE(conf, 1 - TV);
DFlash (the same model class without the sequential heads) = CE only. The Markov bias and
the confidence are teacher forced: the previous token is the ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ascend_dspark.drafters.block_backbone import BlockDrafter

from . import losses
from .batch import TargetBatch


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, row_seeds: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors [B, A] long, valid [B, A] bool): up to A distinct positions a per row with
    x_a and x_{a+1} both response tokens, uniformly at random. Each row draws from its own
    CPU generator (seeded by the trainer from the step and the row's place in the *global*
    batch), so the choice is the same on any device and however the batch is split over ranks."""
    mask = loss_mask.cpu()
    ok = torch.zeros_like(mask)
    ok[:, :-1] = mask[:, :-1] & mask[:, 1:]
    scores = torch.stack([torch.rand(mask.shape[1], generator=torch.Generator().manual_seed(s)) for s in row_seeds])
    scores = torch.where(ok, scores, torch.full_like(scores, -1.0))
    top = scores.topk(min(num_anchors, mask.shape[1]), dim=1)
    return top.indices.to(loss_mask.device), (top.values >= 0).to(loss_mask.device)


def block_hidden_train(drafter: BlockDrafter, features: torch.Tensor, input_ids: torch.Tensor,
                       anchors: torch.Tensor) -> torch.Tensor:
    """h = norm(x) of every block slot, [B, A, n, H], differentiable (no cache)."""
    b, t = input_ids.shape
    a, n = anchors.shape[1], drafter.block_size
    dev = input_ids.device
    c = drafter.hidden_norm(drafter.fc(features.to(drafter.dtype)))
    cos_c, sin_c = drafter.rotary(torch.arange(t, device=dev).expand(b, t), c.dtype)

    ids = torch.full((b, a, n), drafter.config.mask_token_id, dtype=torch.long, device=dev)
    ids[:, :, 0] = input_ids.gather(1, anchors)
    x = drafter.embed(ids).view(b, a * n, -1)
    positions = (anchors.unsqueeze(-1) + torch.arange(n, device=dev)).view(b, a * n)
    cos_b, sin_b = drafter.rotary(positions, x.dtype)

    anchor_of_query = anchors.repeat_interleave(n, dim=1)                              # [B, A*n]
    sees_context = torch.arange(t, device=dev) < anchor_of_query.unsqueeze(-1)        # [B, A*n, T]
    block_id = torch.arange(a, device=dev).repeat_interleave(n)
    sees_block = (block_id.unsqueeze(1) == block_id.unsqueeze(0)).expand(b, -1, -1)   # [B, A*n, A*n]
    mask = torch.cat([sees_context, sees_block], dim=-1).unsqueeze(1)

    for layer in drafter.layers:
        attn = layer.self_attn
        k_ctx, v_ctx = attn.key_value(c, cos_c, sin_c)
        xn = layer.input_layernorm(x)
        q = attn.query(xn, cos_b, sin_b)
        k_blk, v_blk = attn.key_value(xn, cos_b, sin_b)
        k = torch.cat([k_ctx, k_blk], dim=1).transpose(1, 2)
        v = torch.cat([v_ctx, v_blk], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                             scale=attn.scale, enable_gqa=q.shape[2] != k.shape[1])
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, a * n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x).view(b, a, n, -1)


def block_draft_logits(drafter: BlockDrafter, features: torch.Tensor, input_ids: torch.Tensor,
                       anchors: torch.Tensor):
    """Teacher-forced draft logits of every block: (logits [B, A, D, V] float32 with the Markov
    bias, confidence logits [B, A, D] or None, labels [B, A, D], label positions [B, A, D])."""
    b, t = input_ids.shape
    num_drafts = drafter.max_draft_tokens
    h = drafter.draft_hidden(block_hidden_train(drafter, features, input_ids, anchors).flatten(0, 1), num_drafts)
    h = h.view(b, anchors.shape[1], num_drafts, -1)
    label_pos = anchors.unsqueeze(-1) + 1 + torch.arange(num_drafts, device=input_ids.device)
    labels = input_ids.gather(1, label_pos.clamp(max=t - 1).flatten(1)).view_as(label_pos)
    logits = drafter.logits(h)
    confidence_logit = None
    if hasattr(drafter, "sequential_terms"):
        prev = torch.cat([input_ids.gather(1, anchors).unsqueeze(-1), labels[..., :-1]], dim=-1)
        bias, confidence_logit = drafter.sequential_terms(h.flatten(0, 1), prev.flatten(0, 1))
        if bias is not None:
            logits = logits + bias.view_as(logits)
        if confidence_logit is not None:
            confidence_logit = confidence_logit.view_as(label_pos)
    return logits, confidence_logit, labels, label_pos


def _teacher_forced(drafter: BlockDrafter, batch: TargetBatch, num_anchors: int, row_seeds: list[int]):
    """Everything both the loss and the validation metrics read: (logits [B, A, D, V],
    confidence logits or None, labels, label positions, supervised [B, A, D] bool,
    p_target [B, A, D, V] (no grad))."""
    ids, mask = batch.input_ids, batch.loss_mask
    t = ids.shape[1]
    anchors, anchor_ok = sample_anchors(mask, num_anchors, row_seeds)
    logits, confidence_logit, labels, label_pos = block_draft_logits(drafter, batch.features, ids, anchors)
    flat = label_pos.clamp(max=t - 1).flatten(1)
    supervised = torch.cumprod((mask.gather(1, flat).view_as(label_pos) & (label_pos < t)).long(), -1).bool()
    supervised &= anchor_ok.unsqueeze(-1)
    with torch.no_grad():
        hidden_at = batch.last_hidden.gather(1, (label_pos - 1).clamp(max=t - 1).flatten(1).unsqueeze(-1)
                                             .expand(-1, -1, batch.last_hidden.shape[-1]))
        p_target = torch.softmax(drafter.target.logits(hidden_at), dim=-1).view_as(logits)
    return logits, confidence_logit, labels, label_pos, supervised, p_target


def block_objective(drafter: BlockDrafter, batch: TargetBatch, num_anchors: int, decay: float,
                    row_seeds: list[int], loss_weights: dict[str, float]
                    ) -> tuple[dict[str, losses.Term], dict[str, torch.Tensor]]:
    """(loss terms by name, metrics) for one batch. `loss_weights` names which terms to build
    (ce, tv, conf); a term with weight 0 is skipped (metrics still report 1 - TV)."""
    logits, confidence_logit, labels, label_pos, supervised, p_target = _teacher_forced(
        drafter, batch, num_anchors, row_seeds)
    weight = losses.position_weights(label_pos.shape[-1], decay, logits.device) * supervised
    p_draft = torch.softmax(logits, dim=-1)
    l1 = losses.l1_distance(p_draft, p_target)
    accept = 1 - l1 / 2

    terms: dict[str, losses.Term] = {}
    if loss_weights.get("ce", 0):
        terms["ce"] = losses.cross_entropy(logits, labels, weight)
    if loss_weights.get("tv", 0):
        terms["tv"] = losses.weighted(l1, weight)
    if loss_weights.get("conf", 0):
        if confidence_logit is None:
            raise ValueError("loss weight 'conf' is set but the drafter has no confidence head")
        terms["conf"] = losses.confidence_bce(confidence_logit, accept, weight)
    metrics = _acceptance_metrics(accept.detach().flatten(0, 1), supervised.flatten(0, 1))
    return terms, metrics


@torch.no_grad()
def block_validation_sums(drafter: BlockDrafter, batch: TargetBatch, num_anchors: int, row_seeds: list[int]
                          ) -> dict[str, torch.Tensor]:
    """Per-slot sums over one batch's supervised block slots (teacher forced), to pool over
    batches: "accept" (1 - TV, the T=1 acceptance of the slot), "argmax" (the draft's argmax
    is the target's: the T=0 acceptance of the slot) and "count"; each [D] float64 on the CPU."""
    logits, _, _, _, supervised, p_target = _teacher_forced(drafter, batch, num_anchors, row_seeds)
    accept = 1 - losses.l1_distance(torch.softmax(logits.float(), dim=-1), p_target) / 2
    agree = (logits.argmax(-1) == p_target.argmax(-1)).float()
    valid = supervised.float()
    dims = tuple(range(valid.dim() - 1))
    return {"accept": (accept * valid).sum(dims).double().cpu(), "argmax": (agree * valid).sum(dims).double().cpu(),
            "count": valid.sum(dims).double().cpu()}


def validation_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Pooled per-slot rates from summed `block_validation_sums`: accept@k / argmax@k (1-based
    slots, conditional on a teacher-forced prefix) and the expected accepted lengths they give
    at T=1 (tau_prob: 1 + sum_k prod_{i<=k} accept@i, DeepSpec's) and at T=0 (tau_argmax)."""
    count = sums["count"].clamp(min=1)
    accept, agree = sums["accept"] / count, sums["argmax"] / count
    out = {f"accept@{k + 1}": float(accept[k]) for k in range(accept.numel())}
    out.update({f"argmax@{k + 1}": float(agree[k]) for k in range(agree.numel())})
    out["tau_prob"] = float(1 + torch.cumprod(accept, 0).sum())
    out["tau_argmax"] = float(1 + torch.cumprod(agree, 0).sum())
    out["slots"] = float(sums["count"].sum())
    return out


def _acceptance_metrics(accept: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Teacher-forced analytic acceptance per slot and the expected accepted length."""
    valid_f = valid.float()
    per_slot = (accept * valid_f).sum(0) / valid_f.sum(0).clamp(min=1)
    out = {f"accept@{k + 1}": per_slot[k] for k in range(per_slot.shape[0])}
    out["tau_prob"] = losses.expected_accepted_length(accept, valid_f)
    return out
