"""Prefill graphs (engine/prefill_graphs.py) give the tokens eager prefills give, on a CUDA
GPU (the H200 runs it; the NPU platform's are checked on CPU through the test double in
test_prefill_graphs.py).

Every drafter, T=0 and seeded T>0; prompts of mixed lengths: three short ones replay one
(4, 16) graph with a padding row, and a 70-token prompt is chunked by max_prefill_tokens 64
(64 tokens at (1, 64), then 6 at (1, 16)). Both engines replay verify steps from graphs, so
they differ only in how prompt chunks run (and in how many chunks a step packs: the graphed
engine's scheduler packs no step past a captured shape).
"""

from __future__ import annotations

import pytest
from test_graphs import setup  # noqa: F401 - the CUDA platform and the tiny float32 target, per module

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

pytestmark = pytest.mark.cuda

LONG = [(11 * i) % 120 + 3 for i in range(70)]
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], [60, 61, 62, 63, 64], LONG]
BUCKETS = ([1, 2, 4], [16, 32, 64])


def engines(setup, kind, **kw):  # noqa: F811
    """An engine with eager prefills and one with prefill graphs over one target, each with its
    own copy of the drafter (a drafter's caches belong to the engine that attached it)."""
    platform, target = setup

    def drafter():
        return create_drafter(kind, target, seed=1).to(platform.device) if kind else None

    # speculation "fixed": the confidence policy's depths follow each engine's measured step
    # costs, so the two engines' accepted lengths could differ by timing alone.
    options = dict(num_speculative_tokens=3, max_model_len=96, max_batch_size=4, platform=platform, graphs=True,
                   graph_buckets=[1, 2, 4], max_prefill_tokens=64, prefill_graph_buckets=BUCKETS,
                   speculation="fixed" if kind else None)
    options.update(kw)
    return Engine(target, drafter(), prefill_graphs=False, **options), \
        Engine(target, drafter(), prefill_graphs=True, **options)


@pytest.mark.parametrize("kind", [None, "eagle3", "dflash", "dspark"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_prefill_graphs_give_the_eager_tokens(setup, kind, temperature):  # noqa: F811
    eager, graphed = engines(setup, kind)
    assert eager.runner.prefill_graphs is None and graphed.runner.prefill_graphs is not None
    captured = len(graphed.runner.prefill_graphs.graphs)
    assert captured == 2 * len(graphed.runner.prefill_graphs.shapes)          # the start-up keys
    params = [SamplingParams(temperature=temperature, seed=10 + i, max_tokens=6 + 5 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    for prompts in (PROMPTS[:3], PROMPTS):
        want = eager.generate(prompts, params[:len(prompts)])
        got = graphed.generate(prompts, params[:len(prompts)])
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.stats.accepted_lengths for o in got] == [o.stats.accepted_lengths for o in want]
    assert graphed.runner.prefill_graphs.failed == {}
    assert graphed.scheduler.num_used_blocks == 0


def test_a_burst_past_the_largest_rows_bucket_is_split_into_graphed_steps(setup):  # noqa: F811
    eager, graphed = engines(setup, "dspark", prefill_graph_buckets=([1, 2], [16]))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in graphed.generate(PROMPTS[:3], params)] == \
        [o.token_ids for o in eager.generate(PROMPTS[:3], params)]
    assert graphed.runner.prefill_graphs.failed == {}
    assert graphed.scheduler.num_used_blocks == 0
