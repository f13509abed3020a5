"""What a drafter's cache holds, reads and writes: `lookahead` is true and the length is the edge.

The engine sizes the drafter's cache from `Drafter.lookahead` (positions at or after the
anchor that one proposal writes as scratch), so that number must be neither understated
(a write past the end raises, or lands in the scratch row where attention never looks)
nor overstated. And everything a drafter reads must sit below its cache length or be
written by the same call: the next step's observe overwrites from the anchor, so entries
at or past the length are stale (rejected drafts, a previous request in a reused slot).

For each drafter and every K: after observing a context (with a right-padded chunk),
- propose writes only positions [anchor, anchor + lookahead), and
  with K = max_draft_tokens reaches anchor + lookahead - 1;
- with the cache exactly anchor + lookahead long, and with every entry at or past the
  length poisoned beforehand, the proposal is the one a roomy, clean cache gives.
"""

from __future__ import annotations

import pytest
import torch
from drafter_helpers import SoftmaxSampling, make_target, random_features, scramble

from ascend_dspark.drafters import create_drafter
from tests.helpers import cache_rows, slot_positions

KINDS = ["eagle3", "dflash", "dspark"]
ANCHOR = 9


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return make_target()


def observed(kind, target, capacity):
    """A drafter whose slot 1 observed positions 0..ANCHOR-1: a prefill of 6, then a verify
    chunk right-padded to 5 positions of which 3 count (so the padding went to scratch)."""
    drafter = scramble(create_drafter(kind, target), seed=5)
    drafter.allocate(2, capacity)
    slot = torch.tensor([1])
    drafter.reset(slot)
    feats = random_features(drafter, 1, ANCHOR + 2, seed=2)
    nxt = torch.randint(0, target.config.vocab_size, (1, ANCHOR + 2), generator=torch.Generator().manual_seed(4))
    drafter.observe(slot, feats[:, :6], torch.arange(6).unsqueeze(0), nxt[:, :6], torch.tensor([6]))
    drafter.observe(slot, feats[:, 6:11], torch.arange(6, 11).unsqueeze(0), nxt[:, 6:11], torch.tensor([3]))
    assert drafter.cache.lengths.tolist() == [0, ANCHOR]
    return drafter, slot, nxt[:, ANCHOR - 1]


def snapshot(drafter):
    return [t.clone() for t in drafter.cache.k + drafter.cache.v]


def written_positions(before, drafter, slot):
    """Positions of `slot` whose K or V changed (a write past the slot's blocks raises)."""
    cache = drafter.cache
    changed = torch.zeros(cache.capacity, dtype=torch.bool)
    for old, new in zip(before, cache.k + cache.v):
        changed |= (slot_positions(cache, old, slot) != slot_positions(cache, new, slot)).flatten(1).any(1)
    return changed.nonzero().flatten().tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_lookahead_is_what_a_proposal_writes(tiny, kind):
    drafter, slot, anchor = observed(kind, tiny, capacity=64)
    la = drafter.lookahead
    reach = []
    for k in range(1, drafter.max_draft_tokens + 1):
        before = snapshot(drafter)
        drafter.propose(slot, anchor, torch.tensor([ANCHOR]), k, SoftmaxSampling(1))
        written = written_positions(before, drafter, 1)
        assert all(ANCHOR <= p < ANCHOR + la for p in written), (kind, k, written, la)
        reach.append(max(written, default=ANCHOR - 1))
    assert max(reach) == ANCHOR + la - 1, (kind, reach, la)          # not overstated either


@pytest.mark.parametrize("kind", KINDS)
def test_tight_poisoned_cache_gives_the_roomy_clean_proposal(tiny, kind):
    roomy, slot, anchor = observed(kind, tiny, capacity=64)
    for k in range(1, roomy.max_draft_tokens + 1):
        tight, _, _ = observed(kind, tiny, capacity=ANCHOR + roomy.lookahead)
        gen = torch.Generator().manual_seed(k)
        stale = cache_rows(tight.cache.tables, 1)[ANCHOR:]
        for t in tight.cache.k + tight.cache.v:                        # stale past the length
            flat = t.view(-1, *t.shape[2:])
            flat[stale] = 1e3 * torch.randn(flat[stale].shape, generator=gen, dtype=torch.float64).to(t.dtype)
        if kind == "eagle3":                       # (a cache of another size sums in another order)
            torch.testing.assert_close(tight.last_hidden[1], roomy.last_hidden[1], rtol=0, atol=1e-12)
        want = roomy.propose(slot, anchor, torch.tensor([ANCHOR]), k, SoftmaxSampling(1))
        got = tight.propose(slot, anchor, torch.tensor([ANCHOR]), k, SoftmaxSampling(1))
        assert torch.equal(got.tokens, want.tokens), (kind, k)
        torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=1e-6)
