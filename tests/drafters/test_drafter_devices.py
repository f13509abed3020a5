"""Drafters keep every tensor they make on their inputs' device.

The CPU suite has one device, so a dropped `device=` argument (`torch.arange(t)` for
`torch.arange(t, device=counts.device)`) is invisible there and only shows on an NPU or a
GPU. Here observe / propose run while the default device is meta (`with torch.device("meta")`)
and the drafter, its cache and every input stay on the CPU: a tensor made without an
explicit device lands on meta, and mixing it with the CPU tensors raises. The oracle is the
same calls on a twin drafter outside the context (the default device does not change the
numbers). tests/mutants/survivors.md lists the mutants these tests kill.
"""

from __future__ import annotations

import pytest
import torch
from drafter_helpers import random_features, scramble

from ascend_dspark.drafters import create_drafter
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams

KINDS = ["eagle3", "dflash", "dspark"]
CPU = torch.device("cpu")


def run_calls(drafter, target, meta: bool):
    """Prefill observe, a proposal, a ragged verify-style observe (counts 1 and 3), a proposal."""
    vocab, width = target.config.vocab_size, 4
    slots = torch.tensor([1, 2])
    gen = torch.Generator().manual_seed(5)
    feats = random_features(drafter, 2, 6)
    tokens = torch.randint(0, vocab, (2, 6), generator=gen)
    step_feats = random_features(drafter, 2, width, seed=2)
    step_tokens = torch.randint(0, vocab, (2, width), generator=gen)
    sampling = SamplingBatch([SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=11)], CPU)
    k = drafter.max_draft_tokens
    drafter.allocate(3, 40)
    drafter.reset(slots)
    with torch.device("meta" if meta else "cpu"):
        anchor_pos = torch.tensor([6, 5], device=CPU)                    # prefill lengths
        drafter.observe(slots, feats, torch.arange(6, device=CPU).repeat(2, 1), tokens, anchor_pos)
        first = drafter.propose(slots, tokens.gather(1, (anchor_pos - 1).unsqueeze(1)).squeeze(1), anchor_pos, k,
                                sampling)
        positions = anchor_pos.unsqueeze(1) + torch.arange(width, device=CPU)
        counts = torch.tensor([1, 3], device=CPU)
        drafter.observe(slots, step_feats, positions, step_tokens, counts)
        anchors = step_tokens.gather(1, (counts - 1).unsqueeze(1)).squeeze(1)
        second = drafter.propose(slots, anchors, anchor_pos + counts, k, sampling)
    return first, second


@pytest.mark.parametrize("kind", KINDS)
def test_observe_and_propose_make_no_tensor_on_the_default_device(kind, target):
    drafter = scramble(create_drafter(kind, target), seed=0)
    twin = scramble(create_drafter(kind, target), seed=0)
    got = run_calls(drafter, target, meta=True)
    want = run_calls(twin, target, meta=False)
    assert drafter.cache.k[0].device == CPU and drafter.cache.lengths.tolist() == [0, 7, 8]
    for g, w in zip(got, want):
        assert g.tokens.device == CPU and g.probs.device == CPU
        assert torch.equal(g.tokens, w.tokens) and torch.equal(g.probs, w.probs)
