"""Eagle3's recurrent state after a verification step, however many drafts it accepted.

Eagle3 drafts from `last_hidden[slot]`: the layer's output at the last observed position.
After a step that accepts nothing the engine observes one row (count 1: the anchor, whose
next token is the correction) out of K + 1; a row observed with count 0 must keep its state.
Greedy output stays exact whatever the state is (the verifier decides), so a wrong state only
costs acceptance, which the engine tests with planting doubles do not measure.

Oracle: a fresh drafter with the same weights that observes each slot's whole committed
sequence in one call (every count the full length): the layer is causal, so the state and
the next proposal cannot depend on how the sequence was chunked.
tests/mutants/survivors.md lists the mutants these tests kill.
"""

from __future__ import annotations

import torch
from drafter_helpers import greedy, random_features, scramble

from ascend_dspark.drafters import create_drafter

SLOTS = torch.tensor([1, 2])
N, WIDTH = 12, 4                            # committed positions per slot; a verify chunk is K + 1 wide


def fresh(target):
    drafter = scramble(create_drafter("eagle3", target), seed=0)
    drafter.allocate(3, 40)
    drafter.reset(SLOTS)
    return drafter


def committed(drafter, vocab: int):
    """Per slot: features of positions 0..N-1 and tokens 0..N (token i+1 follows position i);
    plus garbage features / tokens for the padding of a chunk (a rejected tail)."""
    gen = torch.Generator().manual_seed(4)
    feats = random_features(drafter, 2, N, seed=1)
    tokens = torch.randint(0, vocab, (2, N + 1), generator=gen)
    junk_feats = random_features(drafter, 2, WIDTH, seed=2, scale=3.0)
    junk_tokens = torch.randint(0, vocab, (2, WIDTH), generator=gen)
    return feats, tokens, junk_feats, junk_tokens


def observe_chunk(drafter, data, starts: list[int], counts: list[int], width: int) -> None:
    """Observe positions starts[b] .. starts[b] + width - 1 of which the first counts[b] are committed."""
    feats, tokens, junk_feats, junk_tokens = data
    f = feats.new_empty(2, width, feats.shape[-1])
    nxt = tokens.new_empty(2, width)
    for b, (s, c) in enumerate(zip(starts, counts)):
        f[b, :c], f[b, c:] = feats[b, s:s + c], junk_feats[b, : width - c]
        nxt[b, :c], nxt[b, c:] = tokens[b, s + 1:s + c + 1], junk_tokens[b, : width - c]
    positions = torch.tensor(starts).unsqueeze(1) + torch.arange(width)
    drafter.observe(SLOTS, f, positions, nxt, torch.tensor(counts))


def from_scratch(target, data, lengths: list[int]):
    """The oracle: each slot's committed positions 0..lengths[b]-1 observed in one call."""
    drafter = fresh(target)
    observe_chunk(drafter, data, [0, 0], lengths, max(lengths))
    return drafter


def test_last_hidden_after_zero_accepted_and_unobserved_rows(target):
    drafter = fresh(target)
    data = committed(drafter, target.config.vocab_size)
    observe_chunk(drafter, data, [0, 0], [5, 4], 5)                       # prefill, ragged

    # Slot 1 accepts nothing (count 1: only the anchor row), slot 2 accepts two drafts.
    observe_chunk(drafter, data, [5, 4], [1, 3], WIDTH)
    oracle = from_scratch(target, data, [6, 7])
    assert drafter.cache.lengths[SLOTS].tolist() == [6, 7]
    torch.testing.assert_close(drafter.last_hidden[SLOTS], oracle.last_hidden[SLOTS])

    # Slot 1 is not observed this time (count 0) and keeps its state; slot 2 accepts nothing.
    before = drafter.last_hidden[1].clone()
    observe_chunk(drafter, data, [6, 7], [0, 1], WIDTH)
    oracle = from_scratch(target, data, [6, 8])
    assert drafter.cache.lengths[SLOTS].tolist() == [6, 8]
    assert torch.equal(drafter.last_hidden[1], before)
    torch.testing.assert_close(drafter.last_hidden[SLOTS], oracle.last_hidden[SLOTS])

    # The next proposal drafts from that state: the same as the oracle's.
    lengths = torch.tensor([6, 8])
    anchors = data[1].gather(1, lengths.unsqueeze(1)).squeeze(1)         # the last told token
    got = drafter.propose(SLOTS, anchors, lengths, drafter.max_draft_tokens, greedy(2))
    want = oracle.propose(SLOTS, anchors, lengths, drafter.max_draft_tokens, greedy(2))
    assert torch.equal(got.tokens, want.tokens)
