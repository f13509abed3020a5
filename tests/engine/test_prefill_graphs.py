"""Prefill graphs (engine/prefill_graphs.py) give what eager prefills give, on the NPU platform
with torch_npu replaced by its TEST DOUBLE (see test_npu_end_to_end.py: capture executes
nothing, replay re-runs the recorded ops, the fused attention's lengths change only through
the graph task update).

Float32 with FIA and the KV scatter admitted (`use_npu_in_float32`) and kv_block_size 128
(paged attention): every kernel, the fused attention with its host lengths included, sits in
the compared loop, so a graph replayed with stale attention hints, or a padding row writing
into a request's cache, changes the tokens. Both engines of a comparison replay verify
steps from graphs; they differ only in how prompt chunks run.

Buckets here: rows (1, 2, 4) x widths (16, 32, 64) within max_prefill_tokens 64, so three
prompts prefill as one (4, 16) replay with a padding row, a 70-token prompt is chunked
(64 tokens replayed at (1, 64), then the rest), and a batch of 5 prompts is past the
largest rows bucket (eager, one warning).
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from test_npu_end_to_end import _build_models_before_the_double, npu, use_npu_in_float32  # noqa: F401

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine import prefill_graphs
from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import tiny_target

K = 3
BUCKETS = ([1, 2, 4], [16, 32, 64])
LONG = [(11 * i) % 120 + 3 for i in range(70)]             # longer than max_prefill_tokens: two chunks
PROMPTS = [[5, 17, 3, 44, 9, 1, 30], [9, 1, 44], [60, 61, 62, 63, 64], LONG]


@functools.cache
def _models(kind: str | None):
    torch.manual_seed(0)
    target, _ = tiny_target("qwen3", dtype=torch.float32)
    drafter = create_drafter(kind, target, seed=1).to(torch.float32) if kind else None
    return target, drafter


@pytest.fixture(scope="module", autouse=True)
def _build_drafters_before_the_double(_build_models_before_the_double):  # noqa: F811  (the fixture)
    for kind in (None, "eagle3", "dflash", "dspark"):
        _models(kind)


def _engine(kind: str | None, prefill: bool, **kw) -> Engine:
    """An engine replaying verify steps from graphs; its prefills too if `prefill`. Each engine
    gets its own copy of the drafter (a drafter's caches belong to the engine that attached it)."""
    target, drafter = _models(kind)
    options = dict(num_speculative_tokens=K, max_model_len=96, max_batch_size=4, kv_block_size=128,
                   max_prefill_tokens=64, graphs=True, graph_buckets=[1, 2, 4], speculation="fixed",
                   prefill_graphs=prefill, prefill_graph_buckets=BUCKETS)
    options.update(kw)
    return Engine(target, copy.deepcopy(drafter), **options)


def _count_replays(engine: Engine, monkeypatch) -> list[tuple[int, int]]:
    """The (rows, width) of every prefill graph replay of this engine."""
    shapes: list[tuple[int, int]] = []
    runner = engine.runner.prefill_graphs
    real = runner.shape_for

    def shape_for(rows, width):
        shape = real(rows, width)
        shapes.append(shape)
        return shape

    monkeypatch.setattr(runner, "shape_for", shape_for)
    return shapes


@pytest.mark.parametrize("kind", [None, "eagle3", "dflash", "dspark"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_prefill_graphs_give_the_eager_tokens(npu, monkeypatch, kind, temperature):  # noqa: F811
    use_npu_in_float32(npu, monkeypatch)
    params = [SamplingParams(temperature=temperature, seed=10 + i, max_tokens=5 + 3 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    eager = _engine(kind, prefill=False)
    graphed = _engine(kind, prefill=True)
    assert eager.runner.prefill_graphs is None and graphed.runner.prefill_graphs is not None
    replays = _count_replays(graphed, monkeypatch)
    want = eager.generate(PROMPTS, params)
    got = graphed.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.stats.accepted_lengths for o in got] == [o.stats.accepted_lengths for o in want]
    # the first step: 3 short prompts + the long one's first 16 tokens -> (4, 16); then the
    # long prompt's other 54 tokens alone -> (1, 64)
    assert replays == [(4, 16), (1, 64)], replays
    assert graphed.runner.prefill_graphs.failed == {}                 # no capture fell back to eager
    assert graphed.scheduler.num_used_blocks == 0 and eager.scheduler.num_used_blocks == 0


def test_a_padding_row_and_a_chunked_prompt(npu, monkeypatch):  # noqa: F811
    """Three prompts need the (4, 16) graph with one padding row; the long prompt alone is
    chunked by max_prefill_tokens (64 tokens at (1, 64), then 6 at (1, 16))."""
    use_npu_in_float32(npu, monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for prompts, shapes in ((PROMPTS[:3], [(4, 16)]), ([LONG], [(1, 64), (1, 16)])):
        eager = _engine("dspark", prefill=False)
        graphed = _engine("dspark", prefill=True)
        replays = _count_replays(graphed, monkeypatch)
        assert [o.token_ids for o in graphed.generate(prompts, params)] == \
            [o.token_ids for o in eager.generate(prompts, params)]
        assert replays == shapes and graphed.runner.prefill_graphs.failed == {}
        pads = graphed.runner.pad_slots
        assert graphed.runner.cache.lengths[pads].tolist() == [0] * len(pads)
        assert graphed.scheduler.num_used_blocks == 0


@pytest.mark.parametrize("kind", ["eagle3", "dspark"])
def test_one_prefill_step_leaves_the_eager_cache_and_drafter_state(npu, monkeypatch, kind):  # noqa: F811
    """After the first step (the prefill of three prompts, one padding row), every request's
    target K/V at its valid positions, its cache lengths, anchors and the drafter's state
    are the eager prefill's."""
    use_npu_in_float32(npu, monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engines = [_engine(kind, prefill=False), _engine(kind, prefill=True)]
    for engine in engines:
        for i, prompt in enumerate(PROMPTS[:3]):
            engine.add_request(f"r{i}", prompt, params)
        engine.step()
    eager, graphed = (e.runner for e in engines)
    slots = [r.slot for r in engines[1].requests.values()]
    assert slots == [r.slot for r in engines[0].requests.values()]
    assert torch.equal(graphed.cache.lengths, eager.cache.lengths)
    assert torch.equal(graphed.anchors[slots], eager.anchors[slots])     # padding slots' anchors are don't-care
    for cache_pair in ((eager.cache, graphed.cache), (eager.drafter.cache, graphed.drafter.cache)):
        for slot, prompt in zip(slots, PROMPTS[:3]):
            rows = _cache_rows(eager, slot, len(prompt))
            for a, b in zip(cache_pair[0].k + cache_pair[0].v, cache_pair[1].k + cache_pair[1].v):
                torch.testing.assert_close(b.view(-1, *b.shape[2:])[rows], a.view(-1, *a.shape[2:])[rows],
                                           rtol=1e-5, atol=1e-6)
        assert torch.equal(cache_pair[1].lengths, cache_pair[0].lengths)
    if kind == "eagle3":
        torch.testing.assert_close(graphed.drafter.last_hidden[slots], eager.drafter.last_hidden[slots], rtol=1e-5,
                                   atol=1e-6)


def _cache_rows(runner, slot: int, length: int) -> torch.Tensor:
    """The flat cache rows of positions 0..length-1 of a slot."""
    blocks = torch.tensor(runner.tables.owned[slot])
    positions = torch.arange(length)
    bs = runner.tables.block_size
    return blocks[positions // bs] * bs + positions % bs


def test_a_burst_is_packed_within_the_largest_bucket(npu, monkeypatch, caplog):  # noqa: F811
    """Ten prompts at once with rows buckets up to 4: the scheduler packs steps of 4, 4 and 2
    chunks, each a captured shape, where the token budget alone would take 8 (and send that
    step down the eager path); the tokens are the eager engine's, and nothing runs eagerly."""
    use_npu_in_float32(npu, monkeypatch)
    prompts = [[3 + i, 7, 9 + i] for i in range(5)] * 2
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    eager = _engine("dspark", prefill=False, max_batch_size=16, graph_buckets=[1, 2, 4, 8, 16])
    graphed = _engine("dspark", prefill=True, max_batch_size=16, graph_buckets=[1, 2, 4, 8, 16],
                      max_prefill_tokens=40, prefill_graph_buckets=([1, 2, 4], [8]))
    replays = _count_replays(graphed, monkeypatch)
    with caplog.at_level("WARNING", logger=prefill_graphs.logger.name):
        got = graphed.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager.generate(prompts, params)]
    assert [r.getMessage() for r in caplog.records if r.name == prefill_graphs.logger.name] == []
    assert replays == [(4, 8), (4, 8), (2, 8)], replays
    assert graphed.scheduler.num_used_blocks == 0


def test_logprobs_requests_prefill_eagerly(npu, monkeypatch, caplog):  # noqa: F811
    use_npu_in_float32(npu, monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    eager = _engine("dspark", prefill=False)
    graphed = _engine("dspark", prefill=True)
    with caplog.at_level("WARNING", logger=prefill_graphs.logger.name):
        got = graphed.generate(PROMPTS[:2], params)
    want = eager.generate(PROMPTS[:2], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.prompt_logprobs for o in got] == [o.prompt_logprobs for o in want]
    warnings = [r.getMessage() for r in caplog.records if r.name == prefill_graphs.logger.name]
    assert len(warnings) == 1 and "logprobs requested" in warnings[0], warnings


def test_shapes_stay_within_the_token_budget_and_the_padding_slots():
    """The default shapes: powers of two, rows * width <= max_prefill_tokens, no more rows
    than padding slots; the smallest shape holding a plan is chosen."""
    runner = prefill_graphs.PrefillGraphRunner(SimpleNamespace(platform=None, pad_slots=list(range(8, 16))),
                                               None, 2048, 4096)
    assert len(runner.shapes) == 26
    assert max(r * w for r, w in runner.shapes) == 2048 and max(r for r, _ in runner.shapes) == 8
    assert runner.shape_for(3, 100) == (4, 128) and runner.shape_for(1, 2048) == (1, 2048)
    assert runner.shape_for(3, 600) is None and runner.shape_for(9, 16) is None
    assert [runner.widest(rows) for rows in (1, 2, 3, 5, 8, 9)] == [2048, 1024, 512, 256, 256, 0]
    wide = prefill_graphs.PrefillGraphRunner(SimpleNamespace(platform=None, pad_slots=list(range(64, 128))),
                                             None, 2048, 4096)
    assert len(wide.shapes) == 33 and max(r for r, _ in wide.shapes) == 32
    assert wide.shape_for(16, 100) == (16, 128) and wide.widest(17) == 64
    assert prefill_graphs.powers_of_two(16, 100) == [16, 32, 64, 100]
    short = prefill_graphs.PrefillGraphRunner(SimpleNamespace(platform=None, pad_slots=[4, 5]), None, 2048, 64)
    assert short.shapes == [(1, 16), (1, 32), (1, 64), (2, 16), (2, 32), (2, 64)]     # no wider than max_model_len
