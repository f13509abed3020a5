"""The measured step-cost table: lookups between and past the profiled points, the disk
cache (one profile per device and shapes; `ASCEND_DSPARK_PROFILE=refresh` measures again),
and a real profile of a tiny model's steps."""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine import step_costs
from ascend_dspark.engine.engine import Engine, depth_menu
from ascend_dspark.engine.step_costs import StepCosts
from tests.helpers import tiny_target

TABLE = StepCosts(batch_sizes=[1, 4], depths=[0, 2, 4], seconds=[[1.0, 2.0, 4.0], [3.0, 4.0, 8.0]], padded=False)


def test_lookups_by_hand():
    assert TABLE.step_seconds(1, 2) == 2.0
    assert TABLE.step_seconds(1, 1) == pytest.approx(1.5)         # between depths 0 and 2
    assert TABLE.step_seconds(2, 0) == pytest.approx(1.0 + 2.0 / 3)  # between batch 1 and 4
    assert TABLE.step_seconds(8, 4) == pytest.approx(16.0)        # past batch 4: in proportion
    assert TABLE.step_seconds(1, 9) == 4.0                         # past the deepest profiled depth
    assert TABLE.steps_per_second(4, 20, 2) == pytest.approx(0.25)
    padded = StepCosts([1, 4], [0, 2, 4], TABLE.seconds, padded=True)
    assert padded.step_seconds(2, 0) == 3.0                        # a batch of 2 runs in the bucket of 4


def test_json_round_trip_and_shape_checks():
    assert StepCosts.from_json(TABLE.to_json()) == TABLE
    with pytest.raises(ValueError, match="sorted"):
        StepCosts([4, 1], [0], [[1.0], [1.0]], padded=False)
    with pytest.raises(ValueError, match="table"):
        StepCosts([1, 4], [0, 1], [[1.0, 1.0]], padded=False)


def test_depth_menu():
    assert depth_menu(7) == [0, 1, 2, 3, 5, 7]
    assert depth_menu(2) == [0, 1, 2]
    assert depth_menu(4) == [0, 1, 2, 3, 4]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    target, _ = tiny_target("llama", dtype=torch.float32)
    return target, create_drafter("dspark", target)


def test_profiled_once_then_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ASCEND_DSPARK_CACHE", str(tmp_path))
    calls = []
    real = step_costs.profile_step_costs
    monkeypatch.setattr(step_costs, "profile_step_costs", lambda *a, **k: calls.append(a) or real(*a, **k))
    target, drafter = tiny
    first = Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=2, graphs=False)
    assert len(calls) == 1
    assert first.costs.batch_sizes == [1, 2] and first.costs.depths == [0, 1, 2, 3]
    assert all(s > 0 for row in first.costs.seconds for s in row)
    second = Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=2, graphs=False)
    assert len(calls) == 1 and second.costs == first.costs
    monkeypatch.setenv("ASCEND_DSPARK_PROFILE", "refresh")
    Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=2, graphs=False)
    assert len(calls) == 2
    # other shapes (another K) are another profile
    monkeypatch.delenv("ASCEND_DSPARK_PROFILE")
    Engine(target, drafter, num_speculative_tokens=2, max_model_len=32, max_batch_size=2, graphs=False)
    assert len(calls) == 3


def test_an_unreadable_cache_is_measured_again(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ASCEND_DSPARK_CACHE", str(tmp_path))
    target, drafter = tiny
    Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=2, graphs=False)
    (cached,) = (tmp_path / "step_costs").glob("*.json")
    cached.write_text("{not json")
    engine = Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=2, graphs=False)
    assert "unreadable" in caplog.text and engine.costs.depths == [0, 1, 2, 3]


def test_profiling_leaves_no_trace_in_request_slots(tiny, tmp_path, monkeypatch):
    """The profile runs on the padding rows: the requests' slots start clean, and the output
    equals an engine that never profiled (fixed policy)."""
    monkeypatch.setenv("ASCEND_DSPARK_CACHE", str(tmp_path))
    target, drafter = tiny
    engine = Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=2, graphs=False)
    assert engine.runner.cache.lengths[:2].tolist() == [0, 0]
    from ascend_dspark.spec.sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    fixed = Engine(target, None, max_model_len=32, max_batch_size=2)
    assert [o.token_ids for o in engine.generate([[1, 2, 3], [4, 5]], params)] == \
        [o.token_ids for o in fixed.generate([[1, 2, 3], [4, 5]], params)]


def test_plain_decoding_column_prices_depth_zero():
    """Depth 0 is judged at plain decoding's cost (the drafter asleep) where it was measured;
    an explicit depth-0-with-drafter lookup still reads the profiled column."""
    costs = StepCosts([1, 4], [0, 2, 4], TABLE.seconds, padded=True, plain_seconds=[0.5, 2.5])
    assert costs.steps_per_second(1, 1, 0) == pytest.approx(2.0)
    assert costs.step_seconds(1, 0) == 1.0 and costs.step_seconds(3, 0, plain=True) == 2.5
    assert costs.steps_per_second(1, 3, 2) == pytest.approx(0.5)
    assert TABLE.steps_per_second(1, 1, 0) == pytest.approx(1.0)   # unmeasured: the profiled column
    with pytest.raises(ValueError, match="plain_seconds"):
        StepCosts([1, 4], [0], [[1.0], [1.0]], padded=False, plain_seconds=[1.0])


def test_recorded_steps_replace_the_profile_by_their_median():
    costs = StepCosts([1, 4], [0, 2, 4], [[1.0, 2.0, 4.0], [3.0, 4.0, 8.0]], padded=True, plain_seconds=[0.5, 2.5])
    for seconds in (9.0, 7.0, 100.0):                      # one stall among three steps
        costs.record(3, 2, seconds)                        # batch 3 runs in the bucket of 4
    assert costs.step_seconds(4, 2) == 9.0                 # median of 7, 9, 100
    assert costs.recorded(4, 2) == [9.0, 7.0, 100.0]
    costs.record(1, 0, 0.25, plain=True)                   # plain and depth-0-with-drafter are two cells
    costs.record(1, 0, 6.0)
    assert costs.step_seconds(1, 0, plain=True) == 0.25 and costs.step_seconds(1, 0) == 6.0
    costs.record(1, 3, 50.0)                               # not a profiled depth: not a cell
    costs.record(16, 2, 50.0)                              # past the largest bucket: nowhere to keep it
    assert costs.recorded(1, 3) == [] and costs.recorded(4, 2) == [9.0, 7.0, 100.0]
    for _ in range(step_costs.RECORDED):                   # the newest RECORDED times decide
        costs.record(4, 2, 1.5)
    assert costs.step_seconds(4, 2) == 1.5
    assert StepCosts.from_json(costs.to_json()) == costs   # the profile round-trips, recorded times stay here
    assert StepCosts.from_json(costs.to_json()).step_seconds(4, 2) == 4.0


def test_cells_not_run_cost_their_profile_plus_the_batch_sizes_overhead():
    """Three steps at (4, depth 2), profiled at 4 s, took 9, 7 and 100 s: 5 s over the
    profile (the median residual); the other cells of batch size 4 cost their profile + 5,
    and batch size 1, with no steps of its own, borrows that overhead."""
    costs = StepCosts([1, 4], [0, 2, 4], [[1.0, 2.0, 4.0], [3.0, 4.0, 8.0]], padded=True, plain_seconds=[0.5, 2.5])
    assert costs.overhead(4) == 0.0 and costs.table()["overhead_ms"] == [None, None]
    for seconds in (9.0, 7.0, 100.0):
        costs.record(4, 2, seconds)
    assert costs.overhead(4) == 5.0 and costs.overhead(1) == 5.0
    assert costs.step_seconds(4, 4) == 13.0 and costs.step_seconds(4, 0, plain=True) == 7.5
    assert costs.step_seconds(4, 1) == pytest.approx((8.0 + 9.0) / 2)   # profile + overhead, then the measured cell
    assert costs.step_seconds(1, 2) == 7.0
    costs.record(1, 0, 0.25, plain=True)                   # faster than its profile: batch size 1's own residual
    assert costs.overhead(1) == 0.0 and costs.step_seconds(1, 2) == 2.0     # never below the profile
    assert costs.table()["overhead_ms"] == [0.0, 5000.0]
    three = StepCosts([1, 2, 4], [0], [[1.0], [1.0], [1.0]], padded=True)
    three.record(1, 0, 2.0)
    three.record(4, 0, 4.0)
    assert three.overhead(2) == 3.0                        # a tie between neighbours: the larger batch size's


def test_one_measured_plain_step_makes_drafting_worth_trying():
    """The profile says plain decoding wins at batch 4 (1 token per row in 1 s against 1.5 in
    4 s at depth 2). One plain step measured at 8 s adds 7 s of overhead to every cell of that
    batch size: depth 2 then costs 11 s, and 1.5 / 11 > 1 / 8, so the policy drafts, without
    having run a depth-2 step there."""
    from ascend_dspark.spec.prefix_scheduler import best_depth
    costs = StepCosts([1, 4], [0, 2], [[1.0, 2.0], [1.0, 4.0]], padded=True, plain_seconds=[1.0, 1.0])
    rows, caps = [[0.4, 0.25]] * 4, [2] * 4           # expected committed tokens at depth 2: 1 + 0.4 + 0.1
    assert best_depth(rows, caps, [0, 2], costs.steps_per_second) == 0      # 4 * 1.5 / 4 < 4 / 1
    costs.record(4, 0, 8.0, plain=True)
    assert best_depth(rows, caps, [0, 2], costs.steps_per_second) == 2      # 4 * 1.5 / 11 > 4 / 8


def test_eager_tables_keep_only_exact_batch_sizes():
    costs = StepCosts([1, 4], [0, 2], [[1.0, 2.0], [3.0, 4.0]], padded=False)
    costs.record(2, 2, 50.0)                               # interpolated, not a cell of its own
    assert costs.step_seconds(2, 2) == pytest.approx(2.0 + 2.0 / 3)
    costs.record(4, 2, 50.0)
    assert costs.step_seconds(4, 2) == 50.0


def test_recorded_costs_turn_the_choice_back_to_plain_decoding():
    """The profile says depth 2 pays at batch 4 (1.5 expected tokens per row in 4 s against 1
    in 3 s); the steps really run say it costs 7 s against plain decoding's 3.5: depth 0."""
    from ascend_dspark.spec.prefix_scheduler import best_depth
    costs = StepCosts([1, 4], [0, 2], [[1.0, 2.0], [3.0, 4.0]], padded=True, plain_seconds=[1.0, 3.0])
    rows, caps = [[0.4, 0.25]] * 4, [2] * 4
    assert best_depth(rows, caps, [0, 2], costs.steps_per_second) == 2      # 4 * 1.5 / 4 = 1.5 > 4 / 3
    costs.record(4, 2, 7.0)
    costs.record(4, 0, 3.5, plain=True)
    assert best_depth(rows, caps, [0, 2], costs.steps_per_second) == 0      # 6 / 7 < 4 / 3.5


def test_the_engine_records_the_steps_it_runs(tiny, tmp_path, monkeypatch):
    """A profiled table learns from the decode steps that run; a table handed in does not."""
    monkeypatch.setenv("ASCEND_DSPARK_CACHE", str(tmp_path))
    from ascend_dspark.spec.sampling import SamplingParams
    target, drafter = tiny
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine = Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=2, graphs=False)
    assert engine.costs.plain_seconds is not None and len(engine.costs.plain_seconds) == 2
    engine.generate([[1, 2, 3], [4, 5]], params)
    recorded = sum(len(engine.costs.recorded(2, d, plain)) for d in engine.costs.depths for plain in (False, True))
    assert recorded >= 8                     # 11 decode steps of two rows; the first follows a prefill
    given = Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=2, graphs=False,
                   step_costs=StepCosts.from_json(engine.costs.to_json()))
    given.generate([[1, 2, 3], [4, 5]], params)
    assert all(not given.costs.recorded(2, d, plain) for d in given.costs.depths for plain in (False, True))


def test_table_shows_profiled_and_measured_cells():
    costs = StepCosts([1, 4], [0, 2], [[0.001, 0.002], [0.003, 0.004]], padded=True, plain_seconds=[0.0005, 0.0025],
                      device="cpu")
    costs.record(3, 2, 0.009)
    costs.record(3, 2, 0.007)
    costs.record(1, 0, 0.0004, plain=True)
    table = costs.table()
    assert table["profiled_ms"] == [[1.0, 2.0], [3.0, 4.0]] and table["plain_profiled_ms"] == [0.5, 2.5]
    assert table["measured_ms"] == [[None, None], [None, 8.0]] and table["measured_steps"] == [[0, 0], [0, 2]]
    assert table["plain_measured_ms"] == [0.4, None] and table["plain_measured_steps"] == [1, 0]
