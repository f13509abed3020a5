"""Acceptance as a wiring check: a drafter that can score must score.

Random drafts are rejected whatever the engine tells the drafter, and greedy output is
exact anyway, so a wiring bug between the engine and the drafter (one position too few
after verification, the first sampled token never told, shifted positions) is invisible to
the lossless tests and only costs acceptance with a trained draft. The reference double
(engine_doubles.ReferenceDrafter, p_plant = 1) drafts the greedy continuation of exactly
the sequence it has been told, around each real drafter: fed right, at T=0 every verify
step accepts all K drafts (mean accepted length K + 1, the maximum), for every drafter and
K, in a ragged batch whose rows leave at different steps and in one that runs into
max_model_len. Told one position too few, it drafts one position off and accepts ~nothing.
"""

from __future__ import annotations

import pytest
from engine_doubles import (KINDS, MAX_K, ReferenceDrafter, greedy_reference, make_target,  # noqa: F401
                            one_thread, real_drafter)

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], [60, 61, 62, 63, 64], [12, 3, 99, 7, 1, 5]]
MAX_TOKENS = [16, 9, 13, 20]


@pytest.fixture(scope="module")
def target():
    return make_target()


@pytest.fixture(scope="module")
def references(target):
    return [greedy_reference(target, p, 32) for p in PROMPTS]


@pytest.mark.parametrize("max_model_len", [64, 19])
@pytest.mark.parametrize("k", [1, 3, MAX_K])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_drafter_accepts_every_draft(target, references, kind, k, max_model_len):
    drafter = ReferenceDrafter(real_drafter(kind, target), references, p_plant=1.0)
    engine = Engine(target, drafter, num_speculative_tokens=k, max_model_len=max_model_len, max_batch_size=3,
                    speculation="fixed")
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    outs = engine.generate(PROMPTS, params)          # 4 requests over 3 slots: one reuses a slot
    for prompt, ref, out in zip(PROMPTS, references, outs):
        assert out.token_ids == ref[len(prompt):len(prompt) + len(out.token_ids)]
        assert out.stats.num_steps >= 1
        # Every step accepts all K drafts: the minimum mean accepted length is the maximum.
        assert out.stats.mean_accepted_length == k + 1, (kind, k, out.stats.accepted_lengths)
