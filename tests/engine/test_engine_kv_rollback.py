"""Rollback is a length, and the length is what the next step uses.

`KVCache.lengths[slot]` is the committed length: the engine starts a slot's next write
there (the anchor's position), and the causal masks built from those positions let the
next forward see positions < length plus its own tokens. A spy around the target records,
on every forward, where each row's write starts and the slot's length at that moment, and
poisons every cache entry at or past the length (finite garbage, K and V, scratch row
included) before the forward runs. Then:
- every verify forward writes [anchor, anchor + K] with anchor = the length =
  prompt + tokens committed so far - 1, and the length after a step is the new anchor
  (accepted drafts + 1 further), for steps that accept 0..K drafts;
- greedy output is still exactly the reference: nothing at or past the length (rejected
  drafts, a previous request's tail in a reused slot) is ever seen.
A length that is never updated, rolled back too far or not far enough fails both.
"""

from __future__ import annotations

import pytest
import torch
from engine_doubles import (MAX_K, ReferenceDrafter, greedy_reference, make_target,  # noqa: F401
                            one_thread, real_drafter)
from torch import nn

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], [60, 61, 62, 63, 64]]
MAX_TOKENS = [14, 9, 12]
POISON = 1e3


class PoisoningSpyTarget(nn.Module):
    """TEST DOUBLE around the real target: logs (slot, first written position, length
    before) per row of every forward, and fills the slot's cache at and past its length
    with garbage first, so anything a forward reads there shows up in the output."""

    def __init__(self, target) -> None:
        super().__init__()
        self.inner = target
        self.config = target.config
        self.log: list[list[tuple[int, int, int, int]]] = []     # per forward: (slot, start, width, length)
        self.gen = torch.Generator().manual_seed(0)

    def logits(self, hidden):
        return self.inner.logits(hidden)

    def forward(self, input_ids, positions, cache, slot_ids, valid, capture_layers=()):
        lengths = cache.lengths[slot_ids].tolist()
        self.log.append([(s, int(positions[b, 0]), int(valid[b].sum()), n)
                         for b, (s, n) in enumerate(zip(slot_ids.tolist(), lengths))])
        for s, n in zip(slot_ids.tolist(), lengths):
            for t in cache.k + cache.v:
                tail = t[s, n:]
                tail.copy_(POISON * torch.randn(tail.shape, generator=self.gen, dtype=torch.float64).to(t.dtype))
        return self.inner(input_ids, positions, cache, slot_ids, valid, capture_layers)


@pytest.fixture(scope="module")
def target():
    return make_target()


@pytest.fixture(scope="module")
def references(target):
    return [greedy_reference(target, p, 32) for p in PROMPTS]


@pytest.mark.parametrize("k", [1, 3, MAX_K])
@pytest.mark.parametrize("kind", ["eagle3", "dspark"])
def test_next_write_starts_at_the_length_and_nothing_past_it_is_seen(target, references, kind, k):
    spy = PoisoningSpyTarget(target)
    drafter = ReferenceDrafter(real_drafter(kind, target), references, p_plant=0.6)
    engine = Engine(spy, drafter, num_speculative_tokens=k, max_model_len=64, max_batch_size=2)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    outs = engine.generate(PROMPTS, params)              # 3 requests over 2 slots: slot 0 is reused

    for prompt, ref, out in zip(PROMPTS, references, outs):
        assert out.token_ids == ref[len(prompt):len(prompt) + len(out.token_ids)]
    accepted = sorted({n for o in outs for n in o.stats.accepted_lengths})
    assert accepted[0] == 1 and accepted[-1] == k + 1, accepted      # full and partial rollbacks happened

    # Replay the log per request: chunks of max_batch_size requests, prefill first, then the
    # verify forwards of the rows still active, in order.
    calls = iter(spy.log)
    final = {}
    for chunk in (range(0, 2), range(2, 3)):
        prefill = next(calls)
        assert [(s, start, n) for s, start, _, n in prefill] == [(slot, 0, 0) for slot, _ in enumerate(chunk)]
        anchors = {slot: len(PROMPTS[i]) for slot, i in enumerate(chunk)}      # the first sampled token's position
        steps = {slot: list(outs[i].stats.accepted_lengths) for slot, i in enumerate(chunk)}
        while any(steps.values()):
            rows = next(calls)
            assert sorted(s for s, *_ in rows) == [s for s in sorted(steps) if steps[s]]
            for s, start, width, length in rows:
                assert length == anchors[s], f"slot {s}: cache length {length}, anchor at {anchors[s]}"
                assert (start, width) == (anchors[s], k + 1), f"slot {s}: wrote {width} from {start}"
                anchors[s] += steps[s].pop(0)                  # accepted drafts + the bonus/correction
        final.update(anchors)
    assert next(calls, None) is None
    # After the last step the length is the last anchor's position (slot 1 kept request 1's).
    assert engine.cache.lengths.tolist() == [final[0], final[1]]
