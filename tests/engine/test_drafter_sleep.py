"""The confidence policy's sleeping drafter: after SLEEP_AFTER steps planned at depth 0 the
drafter stops observing (steps cost what plain decoding costs), requests admitted while it
sleeps never draft, seeded sampled requests keep drafting, and it wakes when the measured
acceptance would pay at the current batch size. Output stays the target's greedy output."""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine import speculation as speculation_module
from ascend_dspark.engine.engine import SLEEP_AFTER, Engine
from ascend_dspark.engine.request import Request
from ascend_dspark.engine.speculation import SpeculationPolicy
from ascend_dspark.engine.step_costs import StepCosts
from ascend_dspark.spec.acceptance import AcceptanceEstimator
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import tiny_target

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=2 * SLEEP_AFTER + 8, ignore_eos=True)
EXPENSIVE = StepCosts([1, 4], [0, 1, 2, 3], [[1.0, 3.0, 3.5, 4.0]] * 2, padded=False)   # drafting never pays
CHEAP = StepCosts([1, 4], [0, 1, 2, 3], [[1.0, 1.001, 1.002, 1.003]] * 2, padded=False)  # it always does


class CountingDrafter(torch.nn.Module):
    """TEST DOUBLE around a real drafter: counts observe calls and the rows they write."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.target_layer_ids, self.max_draft_tokens = inner.target_layer_ids, inner.max_draft_tokens
        self.observed_rows = 0

    @property
    def lookahead(self):
        return self.inner.lookahead

    def attach(self, *args):
        self.inner.attach(*args)

    def kv_bytes_per_block(self, *args):
        return self.inner.kv_bytes_per_block(*args)

    def reset(self, slot_ids):
        self.inner.reset(slot_ids)

    def propose(self, *args):
        return self.inner.propose(*args)

    def observe(self, slot_ids, features, positions, next_tokens, counts, ctx=None):
        self.observed_rows += int((counts > 0).sum())
        self.inner.observe(slot_ids, features, positions, next_tokens, counts, ctx)


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    ours, _ = tiny_target("llama", dtype=torch.float64)
    return ours


@pytest.fixture(scope="module")
def plain(target):
    return [o.token_ids for o in Engine(target, None, max_model_len=128, max_batch_size=2).generate(PROMPTS, GREEDY)]


def make(target, costs):
    drafter = CountingDrafter(create_drafter("dspark", target).to(torch.float64))
    return Engine(target, drafter, num_speculative_tokens=3, max_model_len=128, max_batch_size=2, graphs=False,
                  step_costs=costs), drafter


def test_the_drafter_sleeps_after_a_run_of_plain_steps(target, plain):
    engine, drafter = make(target, EXPENSIVE)
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == plain
    assert engine.drafter_asleep and engine.drafter_sleeps == 1
    # observed: both prefills and the first SLEEP_AFTER - 1 depth-0 steps (the step whose plan
    # completes the run is already plain), nothing after
    assert drafter.observed_rows == len(PROMPTS) * SLEEP_AFTER
    # requests admitted while it sleeps: no observe at all, prefill included
    again = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in again] == plain
    assert drafter.observed_rows == len(PROMPTS) * SLEEP_AFTER
    assert all(set(o.stats.proposal_lengths) == {0} for o in again)


def test_it_wakes_when_drafting_would_pay_at_this_batch_size(target, plain):
    engine, drafter = make(target, EXPENSIVE)
    engine.generate(PROMPTS, GREEDY)
    assert engine.drafter_asleep
    engine.costs = CHEAP                       # as if the load had changed what a step costs
    outs = engine.generate(PROMPTS, GREEDY)
    assert not engine.drafter_asleep
    assert [o.token_ids for o in outs] == plain
    # admitted asleep, these two never draft; the ones admitted after the wake-up do
    assert all(set(o.stats.proposal_lengths) == {0} for o in outs)
    later = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in later] == plain
    assert all(max(o.stats.proposal_lengths) == 3 for o in later)


def test_seeded_sampled_requests_keep_drafting(target):
    engine, _ = make(target, EXPENSIVE)
    engine.generate(PROMPTS, GREEDY)
    assert engine.drafter_asleep
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = engine.generate(PROMPTS[:1], seeded)[0]
    assert set(out.stats.proposal_lengths) == {3}
    assert out.token_ids == Engine(target, create_drafter("dspark", target).to(torch.float64), num_speculative_tokens=3,
                                   max_model_len=128, max_batch_size=2, graphs=False,
                                   speculation="fixed").generate(PROMPTS[:1], seeded)[0].token_ids


def test_sleep_threshold_is_a_run_not_a_total(target, monkeypatch):
    """Depth-0 plans separated by a drafting step do not add up."""
    engine, _ = make(target, EXPENSIVE)
    plans = iter([0] * (SLEEP_AFTER - 1) + [3] + [0] * (SLEEP_AFTER - 1) + [3] * 100)
    monkeypatch.setattr(speculation_module, "best_depth", lambda *a, **k: next(plans))
    engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2 * SLEEP_AFTER + 4, ignore_eos=True))
    assert not engine.drafter_asleep


@pytest.mark.parametrize("costs, asleep", [(CHEAP, False), (EXPENSIVE, True)])
def test_requests_that_draft_badly_do_not_put_the_drafter_to_sleep(costs, asleep):
    """Two requests whose own acceptance fell to 0 plan depth 0 step after step. Measured
    across requests (the prior, 0.8), drafting still pays at CHEAP costs: the drafter stays
    awake, and the two may draft again once their estimate would pay. At EXPENSIVE costs (the
    control) the same run sleeps, which takes drafting from both for good."""
    policy = SpeculationPolicy("confidence", 3, costs, AcceptanceEstimator(3))
    requests = [Request(f"r{i}", [5, 6], SamplingParams(temperature=0.0), frozenset(), i) for i in range(2)]
    for r in requests:
        r.acceptance.rates = [0.0] * 3
    policy.attach({r.request_id: r for r in requests})
    for _ in range(2 * SLEEP_AFTER):
        assert policy.verify_lens(requests) == [0, 0]
    assert policy.drafter_asleep is asleep
    assert [r.drafter_asleep for r in requests] == [asleep, asleep]
