"""When the overlapping engine chains a step, counted against its rule.

With `overlap`, step() launches a decode batch's next step before reading the last one
(engine.py, Engine.step): a chained step is launched only while the step in flight cannot
finish a row by length (it commits at most K + 1 tokens) and no waiting request could be
admitted. So when every step commits a known number of tokens (plain decoding: 1; a
drafter whose drafts are all accepted: K + 1), the counts are fixed by hand: the prefill
and the first decode step are never chained, every later step is, and no launched step
goes unused. The tokens are those of the synchronous engine (test_continuous_batching.py
checks that at length); here the schedule itself is pinned.
"""

from __future__ import annotations

import pytest
from engine_doubles import Launches, ReferenceDrafter, greedy_reference, make_target, one_thread, real_drafter  # noqa: F401

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

PROMPT = [5, 17, 3]


@pytest.fixture(scope="module")
def target():
    return make_target()


def drain(engine) -> tuple[list[int], int]:
    """Step until done; (tokens, step() calls)."""
    tokens, calls = [], 0
    while engine.has_unfinished():
        tokens += [t for d in engine.step() for t in d.new_token_ids]
        calls += 1
        assert calls < 100
    return tokens, calls


@pytest.mark.parametrize("limit", ["max_tokens", "max_model_len"])
def test_plain_decoding_chains_every_step_after_the_first(target, limit):
    # 9 tokens, stopped by max_tokens or by max_model_len (3 + 9 = 12).
    max_model_len, max_tokens = (64, 9) if limit == "max_tokens" else (12, 100)
    engine = Engine(target, None, max_model_len=max_model_len, max_batch_size=2, overlap=True)
    launches = Launches(engine)
    engine.add_request("a", PROMPT, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    tokens, calls = drain(engine)
    assert tokens == greedy_reference(target, PROMPT, 9)[len(PROMPT):]
    # The prefill (first token), the first decode step, then 7 chained ones: 9 launches for
    # 9 tokens; the call that reads the last step launches nothing.
    assert (*launches.counts, calls) == (9, 7, 10)


def test_all_accepted_drafts_chain_while_k_plus_1_more_stay_below_max_tokens(target):
    k = 3
    reference = greedy_reference(target, PROMPT, 32)
    # K drafts every step (the confidence policy's depth follows measured step times).
    engine = Engine(target, ReferenceDrafter(real_drafter("dspark", target), [reference]),
                    num_speculative_tokens=k, max_model_len=64, max_batch_size=2, overlap=True, speculation="fixed")
    launches = Launches(engine)
    engine.add_request("a", PROMPT, SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
    tokens, _ = drain(engine)
    assert tokens == reference[len(PROMPT):len(PROMPT) + 14]
    # 1 token at prefill, then 4 per step: a step is chained at 1, 5 and 9 tokens read
    # (+ 4 in flight + 4 < 14), not at 13; the step in flight then ends it (13 + 4 >= 14).
    assert launches.counts == (5, 3)


def test_a_request_that_can_join_ends_the_chain_at_once(target):
    engine = Engine(target, None, max_model_len=64, max_batch_size=2, overlap=True)
    launches = Launches(engine)
    engine.add_request("a", PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert launches.chained == 2
    engine.add_request("b", [9, 1, 44, 2], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    got = {"a": [], "b": []}
    for d in engine.step():
        got[d.request_id] += d.new_token_ids
    # The step in flight is read, then b is prefilled (its first token) next to a's step.
    assert (len(got["a"]), len(got["b"])) == (2, 1)
    assert launches.chained == 2


def test_without_overlap_every_call_reads_the_step_it_ran(target):
    engine = Engine(target, None, max_model_len=64, max_batch_size=2, overlap=False)
    launches = Launches(engine)
    engine.add_request("a", PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    per_call = []
    while engine.has_unfinished():
        per_call.append(sum(len(d.new_token_ids) for d in engine.step()))
        assert len(per_call) < 20
    assert per_call == [1] * 6 and launches.counts == (6, 0)
