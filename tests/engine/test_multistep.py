"""Several plain decode steps per launch (engine/multistep.py) give the tokens of single steps.

The oracle is the same engine with `decode_steps_per_launch=1` (and, at T=0, plain greedy
decoding through the model's own forward): tokens, finish reasons and per-request stats
must be identical, with and without overlap, at T=0 and seeded T>0, at batch 1 and for a
batch whose requests end at different lengths, with requests stopping inside a launch (EOS,
a stop token, a stop string), joining while others decode, and behind a drafter that fell
asleep. Every test also counts the multi-step launches, so none passes with the feature
off, and checks that every KV block came back.
"""

from __future__ import annotations

import pytest
import torch
from engine_doubles import Launches, greedy_reference, make_target, one_thread, real_drafter  # noqa: F401

from ascend_dspark.engine.engine import SLEEP_AFTER, Engine
from ascend_dspark.engine.step_costs import StepCosts
from ascend_dspark.models.tokenizer import Tokenizer
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import tiny_tokenizer

N = 4
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], [60, 61, 62, 63, 64]]
EXPENSIVE = StepCosts([1, 4], [0, 1, 2, 3], [[1.0, 3.0, 3.5, 4.0]] * 2, padded=False)   # drafting never pays


@pytest.fixture(scope="module")
def target():
    return make_target()


def make(target, steps: int, overlap: bool, drafter=None, **kw) -> Engine:
    kw = dict(max_model_len=64, max_batch_size=4, overlap=overlap, decode_steps_per_launch=steps) | kw
    return Engine(target, drafter, **kw)


def tokens_and_stats(outputs):
    return [(o.token_ids, o.finish_reason, o.stats.accepted_lengths, o.stats.proposal_lengths) for o in outputs]


def mid_launch(j: int) -> bool:
    """Whether output token j of a lone request (batch 1) is committed by a step inside a
    multi-step launch, not its last: token 0 comes from the prefill, then launches of N."""
    return j >= 1 and (j - 1) % N < N - 1


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("batch", [1, 3])
def test_multi_step_launches_give_the_tokens_of_single_steps(target, overlap, temperature, batch):
    # max_tokens of every residue mod N: launches of N stop short of each row's end.
    params = [SamplingParams(temperature=temperature, seed=10 + i, max_tokens=m, ignore_eos=True)
              for i, m in enumerate((23, 9, 18)[:batch])]
    single, multi = make(target, 1, overlap), make(target, N, overlap)
    want = single.generate(PROMPTS[:batch], params)
    launches = Launches(multi)
    got = multi.generate(PROMPTS[:batch], params)
    assert tokens_and_stats(got) == tokens_and_stats(want)
    assert all(o.stats.accepted_lengths == [1] * (len(o.token_ids) - 1) for o in got)    # N steps of 1 token
    if temperature == 0:
        assert [o.token_ids for o in got] == [greedy_reference(target, p, len(o.token_ids))[len(p):]
                                              for p, o in zip(PROMPTS, got)]
    assert multi.depth_counts == single.depth_counts
    assert multi.multistep.launches == launches.steps.count(N) >= 2
    assert launches.launched < sum(len(o.token_ids) for o in got)
    assert multi.scheduler.num_used_blocks == 0 and single.scheduler.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_lone_request_runs_launches_of_n_until_fewer_than_n_tokens_are_left(target, overlap):
    engine = make(target, N, overlap)
    launches = Launches(engine)
    engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True))
    # The prefill's token, 5 launches of 4 (tokens 1..20), then 2 single steps (21, 22).
    # With overlap every decode launch but the first is chained behind the one in flight.
    assert launches.steps == [1, N, N, N, N, N, 1, 1]
    assert launches.counts == (8, 6 if overlap else 0)


@pytest.mark.parametrize("overlap", [False, True])
def test_eos_inside_a_launch_drops_the_tokens_after_it(target, overlap):
    free = greedy_reference(target, PROMPTS[0], 24)[len(PROMPTS[0]):]
    j = next(j for j in range(5, 20) if mid_launch(j) and free[j] not in free[:j])
    single, multi = make(target, 1, overlap), make(target, N, overlap)
    for engine in (single, multi):
        engine.outputs.eos_token_ids = frozenset({free[j]})       # the engine's EOS, for this test
    params = SamplingParams(temperature=0.0, max_tokens=24)
    want, got = single.generate([PROMPTS[0]], params), multi.generate([PROMPTS[0]], params)
    assert got[0].token_ids == free[: j + 1] and got[0].finish_reason == "stop"
    assert tokens_and_stats(got) == tokens_and_stats(want)
    assert multi.multistep.launches >= 2 and multi.scheduler.num_used_blocks == 0
    # The slot the stop left advanced past it on the device serves the next request right.
    again = multi.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert again[0].token_ids == greedy_reference(target, PROMPTS[1], 12)[len(PROMPTS[1]):]
    assert multi.scheduler.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stop_token_inside_a_launch_ends_one_row_of_a_batch(target, overlap):
    free = greedy_reference(target, PROMPTS[0], 24)[len(PROMPTS[0]):]
    j = next(j for j in range(5, 20) if mid_launch(j) and free[j] not in free[:j])
    params = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[free[j]], ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=30, ignore_eos=True)]
    single, multi = make(target, 1, overlap), make(target, N, overlap)
    want, got = single.generate(PROMPTS[:2], params), multi.generate(PROMPTS[:2], params)
    assert got[0].token_ids == free[: j + 1] and got[0].finish_reason == "stop"
    assert tokens_and_stats(got) == tokens_and_stats(want)
    assert multi.multistep.launches >= 3 and multi.scheduler.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stop_string_inside_a_launch_ends_the_request_where_single_steps_do(target, overlap):
    tokenizer = Tokenizer(tiny_tokenizer())
    prompt = [40, 41, 42]
    single, multi = make(target, 1, overlap, tokenizer=tokenizer), make(target, N, overlap, tokenizer=tokenizer)
    free = single.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0].token_ids
    # A two-token stop string first completed by a token in the middle of a launch.
    j = next(j for j in range(6, 24) if mid_launch(j) and tokenizer.decode(free[j - 1:j + 1]).strip()
             and tokenizer.decode(free[j - 1:j + 1]) not in tokenizer.decode(free[:j]))
    stop = tokenizer.decode(free[j - 1:j + 1])
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop])
    want, got = single.generate([prompt], params), multi.generate([prompt], params)
    assert got[0].finish_reason == "stop" and got[0].token_ids == free[: j + 1]
    assert tokens_and_stats(got) == tokens_and_stats(want) and got[0].text == want[0].text
    assert multi.multistep.launches >= 2 and multi.scheduler.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_requests_joining_while_others_decode_get_their_own_tokens(target, overlap):
    """Continuous batching: a request added mid-decode ends the run of multi-step launches
    (it joins at the next launch); the tokens of every request are those it gets alone."""
    params = [SamplingParams(temperature=0.8, seed=20 + i, max_tokens=m, ignore_eos=True)
              for i, m in enumerate((30, 14, 11))]
    want = [make(target, 1, False).generate([p], [q])[0].token_ids for p, q in zip(PROMPTS, params)]
    engine = make(target, N, overlap)
    got: dict[str, list[int]] = {}
    launches_seen = []
    arrivals = {3: 1, 6: 2}                 # step() call -> the request that arrives before it
    engine.add_request("r0", PROMPTS[0], params[0], detokenize=False)
    calls = 0
    while engine.has_unfinished() or calls in arrivals:
        if calls in arrivals:
            i = arrivals[calls]
            engine.add_request(f"r{i}", PROMPTS[i], params[i], detokenize=False)
        launches_seen.append(engine.multistep.launches)
        for d in engine.step():
            got.setdefault(d.request_id, []).extend(d.new_token_ids)
        calls += 1
        assert calls < 100
    assert [got[f"r{i}"] for i in range(3)] == want
    assert launches_seen[3] >= 1                        # multi-step ran before the first arrival
    assert engine.multistep.launches > launches_seen[6]   # and again once all three decoded
    assert engine.scheduler.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_sleeping_drafter_lets_plain_steps_run_n_per_launch(target, overlap):
    """The confidence policy puts the drafter to sleep after SLEEP_AFTER depth-0 plans; from
    then on the batch is plain and launches carry N steps. Tokens, stats and what the drafter
    was fed are those of the single-step engine."""
    params = SamplingParams(temperature=0.0, max_tokens=2 * SLEEP_AFTER + 12, ignore_eos=True)

    def run(steps):
        engine = make(target, steps, overlap, real_drafter("dspark", target), num_speculative_tokens=3,
                      step_costs=EXPENSIVE, graphs=False)
        outs = engine.generate(PROMPTS[:2], params)
        assert engine.drafter_asleep
        return engine, outs

    single, want = run(1)
    multi, got = run(N)
    assert tokens_and_stats(got) == tokens_and_stats(want)
    assert [o.stats.confidences for o in got] == [o.stats.confidences for o in want]
    assert [o.token_ids for o in got] == [greedy_reference(target, p, len(o.token_ids))[len(p):]
                                          for p, o in zip(PROMPTS, got)]
    assert multi.depth_counts == single.depth_counts
    assert multi.multistep.launches >= 3 and multi.scheduler.num_used_blocks == 0


def test_a_waking_drafter_keeps_its_rows_single_step(target):
    """Requests that may draft (the drafter awake) never run multi-step launches."""
    engine = make(target, N, True, real_drafter("dspark", target), num_speculative_tokens=3, speculation="fixed",
                  graphs=False)
    engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert engine.multistep.launches == 0


def test_logprobs_rows_run_single_steps_with_the_same_tokens(target):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    engine = make(target, N, False)
    got = engine.generate(PROMPTS[:1], params)
    assert engine.multistep.launches == 0
    assert got[0].token_ids == greedy_reference(target, PROMPTS[0], 12)[len(PROMPTS[0]):]


def test_the_step_cost_table_learns_a_launch_of_n_steps_at_a_1_nth_share(target, monkeypatch):
    """The policy's step_read records the time between two reads; a launch of N steps is
    recorded once, divided by N (a fake clock advances one second per step() call)."""
    from ascend_dspark.engine import speculation

    now = [0.0]
    monkeypatch.setattr(speculation.time, "perf_counter", lambda: now[0])
    engine = make(target, N, False)
    recorded = []
    engine.policy.record_step = lambda rows, depth, drafter_ran, seconds: recorded.append((depth, seconds))
    launches = Launches(engine)
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        now[0] += 1.0
    # Launches: prefill, then 3 of N (tokens 1..12), then 2 single steps; the first decode
    # launch after the prefill is not recorded.
    assert launches.steps == [1, N, N, N, 1, 1]
    assert recorded == [(0, 1.0 / N), (0, 1.0 / N), (0, 1.0), (0, 1.0)]


def test_decode_steps_per_launch_is_checked_and_defaults_to_1_without_graphs(target):
    with pytest.raises(ValueError, match="decode_steps_per_launch"):
        make(target, 0, False)
    assert Engine(target, None, max_model_len=64, max_batch_size=2).multistep.steps_per_launch == 1


def test_blocks_for_the_n_positions_are_reserved_before_the_launch(target):
    """A launch of N steps writes N positions past the anchor: the rows hold blocks for them
    when it is launched (block size 2 makes every launch cross block boundaries)."""
    engine = make(target, N, False, kv_block_size=2)
    seen = []
    decode_steps = engine.runner.decode_steps

    def checked(requests, steps, ahead=0):
        for r in requests:
            owned = len(engine.runner.tables.owned[r.slot]) * 2
            seen.append(owned - (r.num_cached + ahead + steps - 1 + engine.runner.reserve))
        return decode_steps(requests, steps, ahead)

    engine.runner.decode_steps = checked
    out = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True))
    assert seen and min(seen) >= 0
    assert [o.token_ids for o in out] == [greedy_reference(target, p, 17)[len(p):] for p in PROMPTS[:2]]
    assert engine.scheduler.num_used_blocks == 0
