"""A request's `num_speculative_tokens` caps what is drafted for it, not only what is
verified: the drafter proposes as many tokens as the largest cap in the decoding batch (the
engine's K when a request sets none), so a batch whose every request is capped at 0 asks
the drafter for nothing. Output stays the target's greedy output whatever the caps."""

from __future__ import annotations

import pytest
from engine_doubles import _Wrapper, greedy_reference, make_target, one_thread, real_drafter  # noqa: F401

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

K = 4
PROMPTS = [[5, 17, 3], [9, 1, 44, 2]]


class DepthSpy(_Wrapper):
    """TEST DOUBLE around a real drafter: records how many tokens each proposal asks for."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.depths: list[int] = []

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        self.depths.append(num_tokens)
        return super().propose(slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx)


@pytest.fixture(scope="module")
def target():
    return make_target()


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
@pytest.mark.parametrize("caps, depth", [((0, 0), 0), ((1, 2), 2), ((None, 0), K), ((9, 1), K)])
def test_the_draft_follows_the_largest_cap_and_output_stays_greedy(target, kind, caps, depth):
    spy = DepthSpy(real_drafter(kind, target))
    engine = Engine(target, spy, num_speculative_tokens=K, max_model_len=64, max_batch_size=2, speculation="fixed")
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, num_speculative_tokens=c) for c in caps]
    outputs = engine.generate(PROMPTS, params)
    # Both requests decode side by side from the first step: every proposal has the same depth.
    assert spy.depths and set(spy.depths) == {depth}
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == greedy_reference(target, prompt, 10)[len(prompt):]
    for cap, out in zip(caps, outputs):
        verified = min(K if cap is None else cap, K)
        assert set(out.stats.proposal_lengths) == {verified}
