"""Rollback is a length, and the length is what the next step uses.

`PagedKVCache.lengths[slot]` is the committed length: the engine starts a slot's next write
there (the anchor's position), and the causal masks built from those positions let the
next forward see positions < length plus its own tokens. A spy around the target records,
on every forward, where each row's write starts and the slot's length at that moment, and
poisons every cache entry of the slot's blocks at or past the length (finite garbage, K
and V) before the forward runs. Then:
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
from tests.helpers import cache_rows
from ops.registry import DEVICE_DEFAULTS

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

    def logits(self, hidden, registry=DEVICE_DEFAULTS):
        return self.inner.logits(hidden, registry)

    def forward(self, input_ids, positions, cache, slot_ids, valid, capture_layers=(), ctx=None):
        lengths = cache.lengths[slot_ids].tolist()
        self.log.append([(s, int(positions[b, 0]), int(valid[b].sum()), n)
                         for b, (s, n) in enumerate(zip(slot_ids.tolist(), lengths))])
        for s, n in zip(slot_ids.tolist(), lengths):
            tail = cache_rows(cache.tables, s)[n:]
            for t in cache.k + cache.v:
                flat = t.view(-1, *t.shape[2:])
                flat[tail] = POISON * torch.randn(flat[tail].shape, generator=self.gen, dtype=torch.float64).to(t.dtype)
        return self.inner(input_ids, positions, cache, slot_ids, valid, capture_layers, ctx)


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
    engine = Engine(spy, drafter, num_speculative_tokens=k, max_model_len=64, max_batch_size=2, speculation="fixed")
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    outs = engine.generate(PROMPTS, params)              # 3 requests over 2 slots: slot 0 is reused

    for prompt, ref, out in zip(PROMPTS, references, outs):
        assert out.token_ids == ref[len(prompt):len(prompt) + len(out.token_ids)]
    accepted = sorted({n for o in outs for n in o.stats.accepted_lengths})
    assert accepted[0] == 1 and accepted[-1] == k + 1, accepted      # full and partial rollbacks happened

    # Replay the log per slot: a slot's first row, or its first row after its request
    # finished, is the next request's prefill (requests are admitted in order); every other
    # row is a verify forward of the slot's current request.
    admitted = iter(range(len(PROMPTS)))
    anchors, steps = {}, {}
    for rows in spy.log:
        for s, start, width, length in rows:
            if not steps.get(s):
                i = next(admitted)
                assert (start, width, length) == (0, len(PROMPTS[i]), 0), f"request {i} prefill in slot {s}"
                anchors[s] = len(PROMPTS[i])               # the first sampled token's position
                steps[s] = list(outs[i].stats.accepted_lengths)
                continue
            assert length == anchors[s], f"slot {s}: cache length {length}, anchor at {anchors[s]}"
            assert (start, width) == (anchors[s], k + 1), f"slot {s}: wrote {width} from {start}"
            anchors[s] += steps[s].pop(0)                  # accepted drafts + the bonus/correction
    assert next(admitted, None) is None and not any(steps.values())
    # After the last step the length is the last anchor's position of each slot's last request.
    assert engine.runner.cache.lengths.tolist() == [anchors[0], anchors[1]]
