"""Continuous batching is invisible in the output, and the KV accounting stays exact.

- A request that joins a running batch mid-flight gives the tokens it gives alone (T=0 and
  seeded T>0, plain and every drafter), also when it is chunk-prefilled next to decoding
  requests, and when a small cache makes requests wait or be preempted and recomputed.
- A randomised stress run (random prompts, parameters, arrival steps and aborts through
  add_request / step / abort on a cache too small for everyone): every request finishes or
  is aborted, the allocator's accounting is exact after every step, nothing leaks.
- A request that can never fit is refused with an error naming the limit; the engine
  keeps serving.
The oracle for "alone" is the same engine class serving one request in a fresh engine
with a roomy cache, which the T=0 tests tie further to a plain greedy loop.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from accounting import check_accounting
from engine_doubles import Launches, greedy_reference, make_target, one_thread, real_drafter  # noqa: F401

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

KINDS = [None, "eagle3", "dflash", "dspark"]
PROMPTS = [[5, 17, 3, 9, 4], [9, 1, 44, 2, 7, 30, 8, 12, 70, 3, 3], [60, 61, 62], [7, 7, 8, 100, 2, 5, 6]]


@pytest.fixture(scope="module")
def target():
    return make_target()


def make_engine(target, kind, k=3, **kwargs):
    """An engine whose launches are counted (`engine.launches`, for check_overlap_ran)."""
    drafter = real_drafter(kind, target) if kind else None
    engine = Engine(target, drafter, num_speculative_tokens=k, **{"max_model_len": 64, "max_batch_size": 4, **kwargs})
    engine.launches = Launches(engine)
    return engine


_ALONE: dict[tuple, list[int]] = {}


def run_alone(target, kind, prompt, params) -> list[int]:
    """The tokens of one request served alone (memoised: the sync and overlap variants share it)."""
    key = (id(target), kind, tuple(prompt), repr(params))
    if key not in _ALONE:
        _ALONE[key] = _serve_alone(target, kind, prompt, params)
    return list(_ALONE[key])


def _serve_alone(target, kind, prompt, params) -> list[int]:
    engine = make_engine(target, kind)
    engine.add_request("alone", prompt, params, detokenize=False)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for d in engine.step() for t in d.new_token_ids]
    return tokens


def serve(engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]], aborts=None) -> dict[str, list[int]]:
    """Step the engine, adding requests at their arrival steps; returns streamed tokens per id."""
    aborts = aborts or {}
    out: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params, detokenize=False)
            out[rid] = []
        for rid in aborts.get(step, []):
            engine.abort(rid)
        for delta in engine.step():
            out[delta.request_id] += delta.new_token_ids
        check_accounting(engine.scheduler)
        if engine._pending is None:               # with a step in flight the device is ahead
            check_device_state(engine)
        step += 1
    return out


def check_device_state(engine) -> None:
    """Every decoding request's device state is its host state: the anchor slot holds its
    last committed token and the cache length is the anchor's position."""
    for r in engine.scheduler.running.values():
        assert int(engine.runner.anchors[r.slot]) == r.output[-1], r.request_id
        assert int(engine.runner.cache.lengths[r.slot]) == r.num_cached == len(r.prompt_ids) + len(r.output) - 1


PARAMS = {
    "greedy": [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (20, 9, 14, 17)],
    "seeded": [SamplingParams(temperature=t, top_p=p, seed=s, max_tokens=m, ignore_eos=True)
               for t, p, s, m in [(1.0, 1.0, 3, 20), (0.8, 0.9, 2**40, 9), (1.2, 1.0, 77, 14), (0.7, 0.95, 5, 17)]],
}


OVERLAP = [pytest.param(False, id="sync"), pytest.param(True, id="overlap")]


def check_overlap_ran(engine, overlap: bool) -> None:
    """The overlap variants really launched steps ahead (else they test nothing new)."""
    assert (engine.launches.chained > 0) == overlap, engine.launches.counts


@pytest.mark.parametrize("overlap", OVERLAP)
@pytest.mark.parametrize("mode", ["greedy", "seeded"])
@pytest.mark.parametrize("kind", KINDS)
def test_joining_mid_flight_gives_the_tokens_it_gives_alone(target, kind, mode, overlap):
    params = PARAMS[mode]
    alone = [run_alone(target, kind, p, q) for p, q in zip(PROMPTS, params)]
    if mode == "greedy":                         # the oracle itself is plain greedy decoding
        for p, q, toks in zip(PROMPTS, params, alone):
            assert toks == greedy_reference(target, p, q.max_tokens)[len(p):]
    # Two requests start; a third joins after 2 steps, a fourth after 5, chunk-prefilled
    # (budget 4 tokens per step) while the others decode.
    engine = make_engine(target, kind, max_prefill_tokens=4, overlap=overlap)
    arrivals = {0: [("r0", PROMPTS[0], params[0]), ("r1", PROMPTS[1], params[1])],
                2: [("r2", PROMPTS[2], params[2])], 5: [("r3", PROMPTS[3], params[3])]}
    out = serve(engine, arrivals)
    assert [out[f"r{i}"] for i in range(4)] == alone
    assert engine.scheduler.num_used_blocks == 0
    check_overlap_ran(engine, overlap)


@pytest.mark.parametrize("overlap", OVERLAP)
@pytest.mark.parametrize("mode", ["greedy", "seeded"])
@pytest.mark.parametrize("kind", [None, "dspark", "eagle3"])
def test_a_small_cache_makes_requests_wait_or_recompute_not_fail(target, kind, mode, overlap):
    """6 blocks of 4 positions for 4 requests that need up to 8 each: requests queue for
    blocks, and decoding ones are preempted (freed, recomputed later) when the cache runs
    out; the tokens are still the ones each request gives alone."""
    params = PARAMS[mode]
    alone = [run_alone(target, kind, p, q) for p, q in zip(PROMPTS, params)]
    engine = make_engine(target, kind, num_kv_blocks=9, kv_block_size=4, overlap=overlap)
    preempted = []
    schedule = engine.scheduler.schedule

    def spying_schedule():
        plan = schedule()
        preempted.extend(r.request_id for r in plan.preempted)
        return plan

    engine.scheduler.schedule = spying_schedule
    out = serve(engine, {0: [(f"r{i}", p, q) for i, (p, q) in enumerate(zip(PROMPTS, params))]})
    assert [out[f"r{i}"] for i in range(4)] == alone
    assert preempted, "the cache was meant to run out"
    assert engine.scheduler.num_used_blocks == 0


def test_a_request_that_can_never_fit_is_refused_and_the_engine_keeps_serving(target):
    engine = make_engine(target, "dspark", num_kv_blocks=3, kv_block_size=4)
    with pytest.raises(ValueError, match=r"KV blocks of 4 tokens.*cache has 3"):
        engine.add_request("big", list(range(1, 12)), SamplingParams(temperature=0.0, max_tokens=30))
    assert not engine.has_unfinished() and "big" not in engine.requests
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    out = serve(engine, {0: [("small", [5, 6], params)]})
    assert out["small"] == greedy_reference(target, [5, 6], 3)[2:]


@pytest.mark.parametrize("overlap", OVERLAP)
def test_abort_frees_the_slot_and_blocks_at_once(target, overlap):
    engine = make_engine(target, "dspark", overlap=overlap)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], params)
    engine.add_request("b", PROMPTS[1], params)
    engine.step()
    engine.step()
    held = engine.scheduler.num_used_blocks
    delta = engine.abort("a")
    assert delta.finish_reason == "abort" and delta.request_id == "a"
    assert 0 < engine.scheduler.num_used_blocks < held
    check_accounting(engine.scheduler)
    assert engine.abort("a") is None                       # unknown now: nothing happens
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_used_blocks == 0 and len(engine.scheduler.free_slots) == 4


@pytest.mark.parametrize("overlap", OVERLAP)
@pytest.mark.parametrize("kind", [None, "dspark"])
def test_randomised_stress_keeps_the_accounting_exact(target, kind, overlap):
    rng = random.Random(11 if kind else 12)
    engine = make_engine(target, kind, max_model_len=40, num_kv_blocks=24, kv_block_size=4, max_prefill_tokens=12,
                         overlap=overlap)
    arrivals: dict[int, list] = {}
    aborts: dict[int, list] = {}
    greedy_ids = {}
    for i in range(120):
        prompt = [rng.randrange(1, 128) for _ in range(rng.randrange(1, 14))]
        greedy = rng.random() < 0.5
        params = SamplingParams(temperature=0.0 if greedy else rng.choice([0.6, 1.0, 1.4]),
                                top_k=rng.choice([0, 5]), seed=rng.randrange(2**31),
                                max_tokens=rng.randrange(1, 20), ignore_eos=rng.random() < 0.7,
                                num_speculative_tokens=rng.choice([None, None, 0, 1]))
        arrive = rng.randrange(0, 150)
        arrivals.setdefault(arrive, []).append((f"q{i}", prompt, params))
        if rng.random() < 0.2:
            aborts.setdefault(arrive + rng.randrange(0, 6), []).append(f"q{i}")
        elif greedy and len(greedy_ids) < 6:
            greedy_ids[f"q{i}"] = (prompt, params)
    out = serve(engine, arrivals, aborts)
    assert not engine.has_unfinished() and not engine.requests
    assert engine.scheduler.num_used_blocks == 0 and len(engine.scheduler.free_slots) == 4
    for rid, (prompt, params) in greedy_ids.items():        # a few survivors, against plain greedy
        want = greedy_reference(target, prompt, params.max_tokens)[len(prompt):]
        stop = next((i for i, t in enumerate(want) if t in target.config.eos_token_ids), None) \
            if not params.ignore_eos else None
        want = want[: stop + 1] if stop is not None else want
        assert out[rid] == want[: len(out[rid])] and (len(out[rid]) == len(want) or len(prompt) + len(out[rid]) >= 40)
    check_overlap_ran(engine, overlap)


def test_preempted_requests_recompute_the_same_sampled_tokens(target, monkeypatch):
    """T>0 with a drafter whose q is a sharpened p (q ~ p^3: many drafts accepted, and a
    rejection's residual max(0, p - q) favours the tokens p finds less likely, so a
    correction token is rarely what a fresh draw from p would give): after a preemption the
    request resumes from its committed tokens (its last token is the anchor again, not
    re-sampled) and produces what the from-the-definitions reference loop of
    test_engine_seeds produces."""
    import test_engine_seeds
    from test_engine_seeds import PARAMS as SEEDED
    from test_engine_seeds import PROMPTS as BOS_PROMPTS
    from test_engine_seeds import ContextDrafter, reference_generate

    def sharpened(target, context):
        p = torch.softmax(test_engine_seeds.target_logits(target, context)[-1], -1)
        return p ** 3 / (p ** 3).sum()

    monkeypatch.setattr(test_engine_seeds, "draft_law", sharpened)     # the double and the reference

    k = 3
    engine = Engine(target, ContextDrafter(target, k), num_speculative_tokens=k, max_model_len=64,
                    max_batch_size=4, num_kv_blocks=6, kv_block_size=4)
    preempted = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (plan := schedule(), preempted.extend(plan.preempted))[0]
    seeded = [dataclasses.replace(p, max_tokens=16) for p in SEEDED]
    out = serve(engine, {0: [(f"r{i}", p, q) for i, (p, q) in enumerate(zip(BOS_PROMPTS, seeded))]})
    assert len(preempted) >= 3, "the cache was meant to run out"
    for i, (prompt, params) in enumerate(zip(BOS_PROMPTS, seeded)):
        assert out[f"r{i}"] == reference_generate(target, prompt, params, k), i


@pytest.mark.parametrize("kind", [None, "dspark", "eagle3"])
def test_overlap_stops_where_the_synchronous_engine_stops(target, kind):
    """Requests that stop on a token in the middle of a chain of steps launched ahead: the
    step already running for them is discarded, and tokens and finish reasons are those of
    the synchronous engine (which reads every step before the next), also for rows that ask
    for logprobs."""
    free = [run_alone(target, kind, p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
            for p in PROMPTS]
    params = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[toks[6]], logprobs=i % 2 * 2)
              for i, toks in enumerate(free)]
    params[3] = SamplingParams(temperature=0.9, seed=4, max_tokens=13, ignore_eos=True)
    results = {}
    for overlap in (False, True):
        engine = make_engine(target, kind, overlap=overlap)
        outs = engine.generate(PROMPTS, params)
        results[overlap] = [(o.token_ids, o.finish_reason) for o in outs]
        check_overlap_ran(engine, overlap)
        assert engine.scheduler.num_used_blocks == 0 and not engine.has_unfinished()
    assert results[True] == results[False]
    assert [reason for _, reason in results[True]] == ["stop"] * 3 + ["length"]
