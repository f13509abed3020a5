"""Generation up to max_model_len with every drafter and every K.

Near the limit the caches are at their fullest: the highest anchor sits at
max_model_len - 2, verification writes K + 1 positions from it and a block drafter's
proposal writes its whole block (DSpark 7, DFlash 8 positions) whatever K is. Sized for
K alone, a DSpark draft with K <= 2 wrote past the end (IndexError) and with K = 3 its
last block slot landed in the scratch row, where attention never looks: no error, just
a different draft. For each drafter and K = 1..7, requests of several lengths (one
starting at max_model_len - 2, one at max_model_len - 1) run into the limit; the output
must be the greedy reference cut at max_model_len, and every proposal of the real
drafter must equal the one it makes when the engine has room to spare (the same requests
under a larger max_model_len, stopped by max_tokens at the same length). An accepted block
that crosses the limit is cut at it, token by token.
"""

from __future__ import annotations

import pytest
import torch
from engine_doubles import (KINDS, MAX_K, ReferenceDrafter, greedy_reference, make_target,  # noqa: F401
                            one_thread, real_drafter)

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

LIMIT = 20
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], list(range(10, 10 + LIMIT - 2)), list(range(30, 30 + LIMIT - 1))]


@pytest.fixture(scope="module")
def target():
    return make_target()


@pytest.fixture(scope="module")
def references(target):
    return [greedy_reference(target, p, LIMIT - len(p) + MAX_K + 1) for p in PROMPTS]


def run(target, references, kind, k, max_model_len, temperature):
    """Under max_model_len = LIMIT the limit stops every request (max_tokens is larger);
    under a larger one max_tokens stops it at the same length."""
    drafter = ReferenceDrafter(real_drafter(kind, target), references, p_plant=0.5)
    engine = Engine(target, drafter, num_speculative_tokens=k, max_model_len=max_model_len, max_batch_size=4)
    params = [SamplingParams(temperature=temperature, seed=i, ignore_eos=True,
                             max_tokens=100 if max_model_len == LIMIT else LIMIT - len(p))
              for i, p in enumerate(PROMPTS)]
    return engine.generate(PROMPTS, params), drafter.raw_proposals


@pytest.mark.parametrize("k", range(1, MAX_K + 1))
@pytest.mark.parametrize("kind", KINDS)
def test_generation_runs_into_max_model_len(target, references, kind, k):
    outs, _ = run(target, references, kind, k, LIMIT, temperature=0.0)
    for prompt, ref, out in zip(PROMPTS, references, outs):
        assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == LIMIT
        assert out.token_ids == ref[len(prompt):LIMIT]
    # Sampled (T = 1, seeded), so draft probabilities are continuous and any change shows.
    outs, proposals = run(target, references, kind, k, LIMIT, temperature=1.0)
    roomy_outs, roomy = run(target, references, kind, k, 4 * LIMIT, temperature=1.0)
    assert all(len(p) + len(o.token_ids) == LIMIT for p, o in zip(PROMPTS, outs))
    assert len(proposals) == len(roomy)
    for step, (tight, spare) in enumerate(zip(proposals, roomy)):
        torch.testing.assert_close(tight.probs, spare.probs, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{kind} K={k} step {step}: the draft depends on the cache size\n{m}")
    assert [o.token_ids for o in roomy_outs] == [o.token_ids for o in outs]
