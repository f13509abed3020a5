"""The engine records, per verify step, the drafter's confidences, the proposal length and
where a stop token fell; `reached_confidences()` is exactly the reached positions.

The oracle is a drafter double that knows the target's greedy continuation: at T=0 a
planted true token is accepted and a planted wrong one rejected, so the double knows,
independently of the engine, how many drafts each step accepts and which confidences it
handed out. Confidences are binary fractions, exact in float32, so the device -> host
round trip is checked with ==.
"""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters.base import DraftProposal
from ascend_dspark.engine.engine import Engine
from ascend_dspark.engine.outputs import RequestStats, merge_stats
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import tiny_target

K = 4
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], [60, 61, 62, 63, 64]]
MAX_TOKENS = [18, 11, 15]            # rows leave the batch at different steps


class PlantingDrafter:
    """TEST DOUBLE: drafts the true greedy continuation except at one position per step
    chosen by a hash of (slot, anchor position) (never, when the hash is >= K), where it
    drafts a wrong token; one-hot draft probabilities. Logs, per slot and step, the anchor
    position, the number of drafts that must be accepted and the confidences it gave."""

    target_layer_ids = ()
    max_draft_tokens = K

    def __init__(self, sequences, vocab, with_confidence=True):
        self.sequences, self.vocab, self.with_confidence = sequences, vocab, with_confidence
        self.log: dict[int, list[tuple[int, int, list[float]]]] = {s: [] for s in range(len(sequences))}

    lookahead = 0

    def attach(self, tables, dtype=None):
        pass

    def reset(self, slot_ids):
        pass

    def observe(self, *args):
        pass

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        tokens = torch.zeros(len(slot_ids), num_tokens, dtype=torch.long)
        conf = torch.zeros(len(slot_ids), num_tokens)
        for b, (slot, pos) in enumerate(zip(slot_ids.tolist(), anchor_positions.tolist())):
            seq = self.sequences[slot]
            wrong = (5 * pos + 3 * slot) % (num_tokens + 2)
            for k in range(num_tokens):
                truth = seq[pos + 1 + k]
                tokens[b, k] = truth if k != wrong else (truth + 1) % self.vocab
                conf[b, k] = ((7 * slot + pos + k) % 15 + 1) / 16
            self.log[slot].append((pos, min(wrong, num_tokens), conf[b].tolist()))
        probs = torch.zeros(len(slot_ids), num_tokens, self.vocab).scatter_(-1, tokens.unsqueeze(-1), 1.0)
        return DraftProposal(tokens=tokens, probs=probs, confidence=conf if self.with_confidence else None)


@pytest.fixture(scope="module")
def setup():
    target, _ = tiny_target("llama", dtype=torch.float64)
    plain = Engine(target, None, max_model_len=64, max_batch_size=3)
    params = SamplingParams(temperature=0.0, max_tokens=max(MAX_TOKENS) + K + 1, ignore_eos=True)
    refs = [o.token_ids for o in plain.generate(PROMPTS, params)]
    return target, [p + r for p, r in zip(PROMPTS, refs)]


def run(setup, with_confidence=True, stop_token_ids=()):
    target, sequences = setup
    drafter = PlantingDrafter(sequences, target.config.vocab_size, with_confidence)
    engine = Engine(target, drafter, num_speculative_tokens=K, max_model_len=64, max_batch_size=3, speculation="fixed")
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, stop_token_ids=list(stop_token_ids))
              for m in MAX_TOKENS]
    return engine.generate(PROMPTS, params), drafter.log


def test_records_the_confidences_of_exactly_the_reached_positions(setup):
    outs, log = run(setup)
    accepted_counts = set()
    for slot, out in enumerate(outs):
        steps = log[slot]
        s = out.stats
        assert s.accepted_lengths == [n + 1 for _, n, _ in steps]
        assert s.proposal_lengths == [K] * len(steps) and s.stop_indices == [None] * len(steps)
        assert s.confidences == [c for _, _, c in steps]
        expected = [(k, c[k], k < n) for _, n, c in steps for k in range(min(n, K - 1) + 1)]
        assert s.reached_confidences() == expected
        accepted_counts |= {n for _, n, _ in steps}
    assert {0, K} <= accepted_counts and accepted_counts - {0, K}       # rejections, partial and full blocks


def test_an_accepted_stop_token_ends_the_reached_positions(setup):
    _, sequences = setup
    free, log = run(setup)
    slot, step, j = first_stop_candidate(sequences, free, log)
    pos, n, conf = log[slot][step]
    eos = sequences[slot][pos + 1 + j]
    outs, _ = run(setup, stop_token_ids=[eos])
    s = outs[slot].stats
    assert outs[slot].finish_reason == "stop" and outs[slot].token_ids[-1] == eos
    assert s.num_steps == step + 1 and s.stop_indices[-1] == j and s.accepted_lengths[-1] == n + 1
    assert s.stop_indices[:-1] == [None] * step
    assert s.reached_confidences()[-(j + 1):] == [(k, conf[k], True) for k in range(j + 1)]


def first_stop_candidate(sequences, free, log):
    """(slot, step, j): draft j of that step is accepted, is not the step's last accepted
    draft, and its token does not occur earlier in the request's output."""
    for slot, steps in log.items():
        for i, (pos, n, _) in enumerate(steps):
            for j in range(n - 1):
                out_index = pos + 1 + j - len(PROMPTS[slot])
                if sequences[slot][pos + 1 + j] not in free[slot].token_ids[:out_index]:
                    return slot, i, j
    raise AssertionError("no accepted draft with a first-occurrence token: change the planting rule")


def test_a_drafter_without_confidences_records_none(setup):
    outs, log = run(setup, with_confidence=False)
    for slot, out in enumerate(outs):
        assert out.stats.confidences == [] and out.stats.reached_confidences() == []
        assert out.stats.proposal_lengths == [K] * len(log[slot])


def test_merge_stats_pools_the_new_fields():
    a, b = RequestStats(), RequestStats()
    a.record(2, 3, [0.5, 0.25, 0.75])
    b.record(0, 3, [0.125, 0.5, 0.5], stop_index=0)
    pooled = merge_stats([a, b])
    assert pooled.proposal_lengths == [3, 3] and pooled.stop_indices == [None, 0]
    assert pooled.confidences == [[0.5, 0.25, 0.75], [0.125, 0.5, 0.5]]
    assert pooled.reached_confidences() == [(0, 0.5, True), (1, 0.25, True), (2, 0.75, False), (0, 0.125, False)]
    plain = RequestStats()
    plain.record(1, 3)
    with pytest.raises(ValueError, match="confidences"):
        merge_stats([a, plain])
