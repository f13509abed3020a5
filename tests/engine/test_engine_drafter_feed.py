"""What the engine feeds a drafter, checked on every call, in every engine configuration.

Greedy output stays exact whatever a drafter is told (verification is lossless), so a
wiring bug between the engine and the drafter (one position too few after verification,
the first sampled token never told, features from the wrong rows) passes the lossless
tests and only costs acceptance with a trained draft. Here a recording double
(engine_doubles.RecordingDrafter) asserts the drafter protocol on every observe / propose,
around each real drafter with a reference-planting double inside (so steps accept 0..K
drafts, not always 0), for batch 1, a ragged batch of 3 whose rows leave at different
steps, batches chunked over reused slots, stop tokens and stop strings, and generation
that runs into max_model_len; K in {1, 3, max}.
"""

from __future__ import annotations

import pytest
from engine_doubles import (KINDS, MAX_K, RecordingDrafter, ReferenceDrafter, greedy_reference, make_target,  # noqa: F401
                            one_thread, real_drafter)

from ascend_dspark.engine.engine import Engine
from ascend_dspark.models.tokenizer import Tokenizer
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import tiny_tokenizer

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], [60, 61, 62, 63, 64]]
REF_LEN = 32                     # reference continuation: past every max_tokens + K


@pytest.fixture(scope="module")
def target():
    return make_target()


@pytest.fixture(scope="module")
def references(target):
    return [greedy_reference(target, p, REF_LEN) for p in PROMPTS]


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def scenario(name, references, tokenizer):
    """(prompts, params, engine kwargs) of one engine configuration."""
    if name == "single":
        return PROMPTS[:1], [greedy(12)], dict(max_model_len=64, max_batch_size=1)
    if name == "ragged":            # rows leave at different steps; a sampled row in between
        params = [greedy(12), SamplingParams(temperature=1.0, seed=11, max_tokens=7, ignore_eos=True), greedy(15)]
        return PROMPTS, params, dict(max_model_len=64, max_batch_size=3)
    if name == "chunked":           # 3 requests over 2 slots: the third reuses slot 0
        return PROMPTS, [greedy(9), greedy(13), greedy(11)], dict(max_model_len=64, max_batch_size=2)
    if name == "stops":             # a stop token id, a stop string, EOS-as-stop-id on a sampled row
        cont = [r[len(p):] for p, r in zip(PROMPTS, references)]
        text = tokenizer.decode(cont[1][:20])
        stop_str = next(text[i:i + 2] for i in range(4, len(text) - 1) if text[i:i + 2].strip())
        params = [greedy(20, stop_token_ids=[cont[0][6]]), greedy(20, stop=[stop_str]),
                  SamplingParams(temperature=0.8, seed=5, max_tokens=20, stop_token_ids=[cont[2][3]]),
                  greedy(20, stop_token_ids=[cont[2][4]])]
        return PROMPTS + PROMPTS[2:], params, dict(max_model_len=64, max_batch_size=4)
    if name == "limit":             # every row runs into max_model_len, at different steps
        return PROMPTS, [greedy(100)] * 3, dict(max_model_len=17, max_batch_size=3)
    raise ValueError(name)


SCENARIOS = ("single", "ragged", "chunked", "stops", "limit")


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("k", [1, 3, MAX_K])
@pytest.mark.parametrize("kind", KINDS)
def test_engine_feeds_the_drafter_the_committed_sequence(target, references, kind, k, name):
    tokenizer = Tokenizer(tiny_tokenizer())
    prompts, params, engine_kw = scenario(name, references, tokenizer)
    drafter = RecordingDrafter(ReferenceDrafter(real_drafter(kind, target), references, p_plant=0.7), k)
    engine = Engine(target, drafter, tokenizer, num_speculative_tokens=k, speculation="fixed", **engine_kw)
    outs = engine.generate(prompts, params)
    drafter.check_run(prompts, outs, target)

    for prompt, prm, out in zip(prompts, params, outs):
        if prm.greedy:                                       # still lossless, for the record
            ref = references[PROMPTS.index(prompt)]
            assert out.token_ids == ref[len(prompt):len(prompt) + len(out.token_ids)]
    if name == "limit":
        assert all(o.finish_reason == "length" and len(p) + len(o.token_ids) == 17 for p, o in zip(prompts, outs))
    if name == "stops":                                      # the sampled row may run to max_tokens
        assert [o.finish_reason for i, o in enumerate(outs) if i != 2] == ["stop"] * 3
    # The counts check above is only worth something if steps accepted drafts.
    assert max(n for o in outs for n in o.stats.accepted_lengths) > 1
