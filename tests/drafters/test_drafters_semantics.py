"""What the drafters compute: block visibility, Markov chaining, confidence, Eagle3 recurrence."""

from __future__ import annotations

import torch
from drafter_helpers import SoftmaxSampling, greedy, random_features, scramble

from ascend_dspark.drafters import create_drafter
from tests.helpers import slot_positions


def dspark(target, **overrides):
    drafter = scramble(create_drafter("dspark", target, **overrides), seed=11)
    drafter.allocate(2, 48)
    return drafter


def observe(drafter, feats, slot=0, start=0):
    t = feats.shape[1]
    drafter.observe(torch.tensor([slot]), feats, torch.arange(start, start + t).unsqueeze(0),
                    torch.zeros(1, t, dtype=torch.long), torch.tensor([t]))


def test_block_is_bidirectional(target, monkeypatch):
    drafter = dspark(target)
    observe(drafter, random_features(drafter, 1, 8))
    args = (torch.tensor([0]), torch.tensor([4]), torch.tensor([8]))
    h = drafter.block_hidden(*args)
    real_embed = drafter.embed

    def perturbed(ids):
        x = real_embed(ids).clone()
        x[:, -1] += 0.5                                  # only the LAST block slot's input changes
        return x

    monkeypatch.setattr(drafter, "embed", perturbed)
    h2 = drafter.block_hidden(*args)
    assert (h2[:, 0] - h[:, 0]).abs().max() > 1e-4      # ... and the FIRST slot's output moves


def test_block_sees_context_before_anchor_only(target):
    drafter = dspark(target)
    feats = random_features(drafter, 1, 12)
    anchor_pos = 8
    observe(drafter, feats[:, :anchor_pos], slot=0)
    observe(drafter, feats, slot=1)                      # features for positions >= anchor_pos too
    drafter.cache.set_lengths(torch.tensor([1]), torch.tensor([anchor_pos]))   # rolled back
    anchors, pos = torch.tensor([4]), torch.tensor([anchor_pos])
    a = drafter.block_hidden(torch.tensor([0]), anchors, pos)
    b = drafter.block_hidden(torch.tensor([1]), anchors, pos)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    pa = drafter.propose(torch.tensor([0]), anchors, pos, 7, SoftmaxSampling(1))
    pb = drafter.propose(torch.tensor([1]), anchors, pos, 7, SoftmaxSampling(1))
    assert torch.equal(pa.tokens, pb.tokens) and torch.equal(pa.probs, pb.probs)
    # ... while context before the anchor does matter.
    feats2 = feats.clone()
    feats2[:, 3] += 1.0
    observe(drafter, feats2[:, :anchor_pos], slot=1)
    c = drafter.block_hidden(torch.tensor([1]), anchors, pos)
    assert (c - a).abs().max() > 1e-4


def test_markov_distribution_depends_on_previous_draft(target):
    drafter = dspark(target)
    observe(drafter, random_features(drafter, 1, 6))
    args = (torch.tensor([0]), torch.tensor([4]), torch.tensor([6]), 4)
    a = drafter.propose(*args, SoftmaxSampling(1, forced=[torch.tensor([t]) for t in (10, 20, 30, 40)]))
    b = drafter.propose(*args, SoftmaxSampling(1, forced=[torch.tensor([t]) for t in (10, 21, 30, 40)]))
    torch.testing.assert_close(a.probs[:, :2], b.probs[:, :2], rtol=0, atol=0)   # up to the changed token
    assert (a.probs[:, 2] - b.probs[:, 2]).abs().max() > 1e-4                   # k = 2 follows token 1
    torch.testing.assert_close(a.probs[:, 3], b.probs[:, 3], rtol=0, atol=0)    # first-order: k = 3 only sees token 2
    assert a.confidence[0, 2] != b.confidence[0, 2]                             # c_k uses W1[x_{k-1}]
    assert a.confidence[0, 1] == b.confidence[0, 1]                             # ... but not x_k itself
    # Exactly softmax(lm_head(h_k) + W2 W1[prev_k]).
    h = drafter.draft_hidden(drafter.block_hidden(*args[:3]), 4)
    prev = torch.tensor([4, 10, 20, 30])
    bias = drafter.markov_head.markov_w2(drafter.markov_head.markov_w1(prev))
    expected = torch.softmax(drafter.logits(h[0]) + bias.float(), -1)
    torch.testing.assert_close(a.probs[0], expected, rtol=1e-6, atol=1e-7)


def test_markov_chain_uses_its_own_samples(target):
    """Sequential stage: a strongly diagonal transition bias makes draft k follow draft k-1."""
    drafter = dspark(target, markov_rank=96)
    with torch.no_grad():
        perm = torch.roll(torch.arange(96), 1)                    # favour prev + 1
        drafter.markov_head.markov_w1.weight.copy_(torch.eye(96, dtype=torch.float64) * 10)
        drafter.markov_head.markov_w2.weight.copy_(torch.eye(96, dtype=torch.float64)[perm] * 10)
    observe(drafter, random_features(drafter, 1, 5))
    prop = drafter.propose(torch.tensor([0]), torch.tensor([40]), torch.tensor([5]), 7, greedy(1))
    assert prop.tokens[0].tolist() == [41, 42, 43, 44, 45, 46, 47]


def test_only_requested_steps_run(target):
    drafter = dspark(target)
    observe(drafter, random_features(drafter, 1, 5))
    sampling = SoftmaxSampling(1)
    drafter.propose(torch.tensor([0]), torch.tensor([1]), torch.tensor([5]), 3, sampling)
    assert sampling.calls == 3


def test_confidence_in_unit_interval(target):
    drafter = dspark(target)
    observe(drafter, random_features(drafter, 1, 5, scale=3.0))
    prop = drafter.propose(torch.tensor([0]), torch.tensor([1]), torch.tensor([5]), 7, SoftmaxSampling(1))
    assert bool(((prop.confidence > 0) & (prop.confidence < 1)).all())
    assert prop.confidence.dtype == torch.float32


def test_dflash_layouts(target):
    fill = scramble(create_drafter("dflash", target), seed=2)
    first = scramble(create_drafter("dflash", target, anchor_first=True, block_size=8), seed=2)
    for d in (fill, first):
        d.allocate(1, 32)
        observe(d, random_features(d, 1, 6))
    assert fill.max_draft_tokens == 7 and first.max_draft_tokens == 8
    args = (torch.tensor([0]), torch.tensor([3]), torch.tensor([6]))
    h = fill.block_hidden(*args)
    torch.testing.assert_close(first.block_hidden(*args), h, rtol=0, atol=0)   # same weights, same block
    sampling = SoftmaxSampling(1)
    pf = fill.propose(*args, 7, sampling)
    pa = first.propose(*args, 7, SoftmaxSampling(1))
    torch.testing.assert_close(pf.probs[0], torch.softmax(fill.logits(h[0, 1:]), -1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pa.probs[0], torch.softmax(first.logits(h[0, :7]), -1), rtol=1e-6, atol=1e-7)


def test_dflash_drafts_are_independent(target):
    drafter = scramble(create_drafter("dflash", target), seed=2)
    drafter.allocate(1, 32)
    observe(drafter, random_features(drafter, 1, 6))
    args = (torch.tensor([0]), torch.tensor([3]), torch.tensor([6]), 4)
    a = drafter.propose(*args, SoftmaxSampling(1, forced=[torch.tensor([[1, 2, 3, 4]])]))
    b = drafter.propose(*args, SoftmaxSampling(1, forced=[torch.tensor([[9, 9, 9, 9]])]))
    assert torch.equal(a.probs, b.probs)


def eagle(target):
    drafter = scramble(create_drafter("eagle3", target), seed=5)
    drafter.allocate(2, 48)
    return drafter


def test_eagle3_chunked_observe_equals_one_chunk(target):
    drafter = eagle(target)
    feats = random_features(drafter, 1, 9)
    nxt = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    drafter.observe(torch.tensor([0]), feats, torch.arange(9).unsqueeze(0), nxt, torch.tensor([9]))
    # Slot 1 in two chunks, the second one right-padded to 6 (counts 4).
    drafter.observe(torch.tensor([1]), feats[:, :5], torch.arange(5).unsqueeze(0), nxt[:, :5], torch.tensor([5]))
    pad_f = torch.cat([feats[:, 5:], torch.zeros_like(feats[:, :2])], 1)
    pad_t = torch.cat([nxt[:, 5:], torch.full((1, 2), -1)], 1)
    drafter.observe(torch.tensor([1]), pad_f, torch.arange(5, 11).unsqueeze(0), pad_t, torch.tensor([4]))
    assert drafter.cache.lengths.tolist() == [9, 9]
    torch.testing.assert_close(drafter.last_hidden[0], drafter.last_hidden[1], rtol=1e-12, atol=1e-12)
    args = (nxt[:, -1], torch.tensor([9]), 7)
    a = drafter.propose(torch.tensor([0]), *args, SoftmaxSampling(1))
    b = drafter.propose(torch.tensor([1]), *args, SoftmaxSampling(1))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-6, atol=1e-7)


def test_eagle3_is_causal_in_observe(target):
    drafter = eagle(target)
    feats = random_features(drafter, 1, 6)
    nxt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    drafter.observe(torch.tensor([0]), feats[:, :4], torch.arange(4).unsqueeze(0), nxt[:, :4], torch.tensor([4]))
    k_before = slot_positions(drafter.cache, drafter.cache.k[0], 0)[:4]
    drafter.observe(torch.tensor([1]), feats, torch.arange(6).unsqueeze(0), nxt, torch.tensor([6]))
    torch.testing.assert_close(slot_positions(drafter.cache, drafter.cache.k[0], 1)[:4], k_before, rtol=0, atol=0)


def test_eagle3_propose_keeps_state(target):
    drafter = eagle(target)
    feats = random_features(drafter, 1, 6)
    nxt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    drafter.observe(torch.tensor([0]), feats, torch.arange(6).unsqueeze(0), nxt, torch.tensor([6]))
    h = drafter.last_hidden.clone()
    a = drafter.propose(torch.tensor([0]), nxt[:, -1], torch.tensor([6]), 7, greedy(1))
    assert drafter.cache.lengths.tolist() == [6, 0]
    assert torch.equal(drafter.last_hidden, h)
    b = drafter.propose(torch.tensor([0]), nxt[:, -1], torch.tensor([6]), 7, greedy(1))
    assert torch.equal(a.tokens, b.tokens)
    # Step k conditions on draft k-1: forcing a different draft 0 changes step 1 only from there on.
    c = drafter.propose(torch.tensor([0]), nxt[:, -1], torch.tensor([6]), 3,
                        SoftmaxSampling(1, forced=[torch.tensor([1]), torch.tensor([2]), torch.tensor([3])]))
    d = drafter.propose(torch.tensor([0]), nxt[:, -1], torch.tensor([6]), 3,
                        SoftmaxSampling(1, forced=[torch.tensor([7]), torch.tensor([2]), torch.tensor([3])]))
    torch.testing.assert_close(c.probs[:, 0], d.probs[:, 0], rtol=0, atol=0)
    assert (c.probs[:, 1] - d.probs[:, 1]).abs().max() > 1e-5
