"""The training forwards see exactly what inference sees.

The oracle is the inference path (`observe` + `propose` over the drafter's slot cache),
a different code path from the batched, cache-free training forwards under test: feeding
a proposal's own draft tokens to the teacher-forced training forward must reproduce the
proposal's probabilities (and DSpark's confidences) at that anchor. A wrong context
visibility, RoPE position, TTT key set or Markov input shows up here as a mismatch.
"""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters import create_drafter
from ascend_dspark.training import losses
from ascend_dspark.training.batch import target_outputs
from ascend_dspark.training.block_objective import block_draft_logits, sample_anchors
from ascend_dspark.training.eagle3_objective import ttt_unroll

from tests.drafters.drafter_helpers import SoftmaxSampling, make_target, scramble

LAYERS = [0, 2, 4]


def _drafter(kind: str, target, **overrides):
    opts = dict(num_layers=2, target_layer_ids=LAYERS)
    if kind in ("dflash", "dspark"):
        opts.update(block_size=4, anchor_first=True)
    if kind == "dspark":
        opts.update(markov_rank=8, confidence_head=True)
    if kind == "eagle3":
        opts.update(num_layers=1, ttt_length=4)
    opts.update(overrides)
    return scramble(create_drafter(kind, target, dtype=torch.float64, **opts), seed=3).eval()


def _propose(drafter, target, prefix: torch.Tensor, num: int):
    """Inference: observe the prefix's features, propose `num` drafts after its last token."""
    a = prefix.shape[1] - 1
    features, _ = target_outputs(target, prefix, torch.tensor([a + 1]), drafter.target_layer_ids)
    drafter.allocate(1, 64, torch.float64, "cpu")
    slots = torch.zeros(1, dtype=torch.long)
    drafter.reset(slots)
    drafter.observe(slots, features[:, :a], torch.arange(a).unsqueeze(0), prefix[:, 1:a + 1], torch.tensor([a]))
    return drafter.propose(slots, prefix[:, a], torch.tensor([a]), num, SoftmaxSampling(1, seed=11))


def _head_types():
    return ["vanilla", "gated", "rnn"]


@pytest.mark.parametrize("kind,head", [("dflash", None)] + [("dspark", h) for h in _head_types()])
def test_block_training_forward_matches_propose(kind, head):
    target = make_target()
    overrides = {} if head is None else {"markov_head_type": head}
    try:
        drafter = _drafter(kind, target, **overrides)
    except (TypeError, ValueError) as exc:          # a head type this build does not know
        pytest.skip(f"{kind}/{head}: {exc}")
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 96, (1, 9), generator=gen)
    a = prefix.shape[1] - 1
    proposal = _propose(drafter, target, prefix, drafter.max_draft_tokens)
    seq = torch.cat([prefix, proposal.tokens, torch.randint(3, 96, (1, 3), generator=gen)], dim=1)
    features, _ = target_outputs(target, seq, torch.tensor([seq.shape[1]]), drafter.target_layer_ids)
    # a second anchor in the same row must not disturb the first (block isolation)
    anchors = torch.tensor([[a, 2]])
    logits, conf_logit, labels, _ = block_draft_logits(drafter, features, seq, anchors)
    torch.testing.assert_close(torch.softmax(logits[0, 0], -1).float(), proposal.probs[0].float(),
                               rtol=1e-5, atol=1e-6)
    assert labels[0, 0].tolist() == proposal.tokens[0].tolist()
    if proposal.confidence is not None:
        torch.testing.assert_close(torch.sigmoid(conf_logit[0, 0]).float(), proposal.confidence[0].float(),
                                   rtol=1e-5, atol=1e-6)


def test_eagle3_ttt_matches_propose():
    target = make_target()
    drafter = _drafter("eagle3", target)
    gen = torch.Generator().manual_seed(6)
    prefix = torch.randint(3, 96, (1, 8), generator=gen)
    a = prefix.shape[1] - 1
    num = drafter.max_draft_tokens
    proposal = _propose(drafter, target, prefix, num)
    seq = torch.cat([prefix, proposal.tokens], dim=1)
    features, _ = target_outputs(target, seq, torch.tensor([seq.shape[1]]), drafter.target_layer_ids)
    for j, hidden in ttt_unroll(drafter, features, seq, num):
        q = torch.softmax(drafter.logits(drafter.norm(hidden[0, a - 1])), -1)
        torch.testing.assert_close(q.float(), proposal.probs[0, j].float(), rtol=1e-5, atol=1e-6)


def test_anchors_only_where_anchor_and_label_are_response():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    anchors, valid = sample_anchors(mask, 8, [0])
    chosen = sorted(anchors[valid].tolist())
    assert chosen == [2, 3, 6]          # a with mask[a] and mask[a+1]; never the last position


def test_position_weights_and_expected_length_closed_form():
    w = losses.position_weights(3, 4.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.7788007831, 0.6065306597]))
    accept = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    valid = torch.ones(2, 2)
    # per-slot means 0.75, 0.25 -> 1 + 0.75 + 0.75 * 0.25
    assert float(losses.expected_accepted_length(accept, valid)) == pytest.approx(1.9375)
