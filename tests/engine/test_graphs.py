"""Whole-step graph replay gives the tokens eager steps give (CUDA; the H200 runs it).

Every drafter, T=0 and seeded T>0, batches of 1, 3 and 4 over buckets (1, 2, 4): a batch
of 3 replays the 4-bucket with a padding row, and requests finishing shrink the batch into
smaller buckets mid-run. A batch above the largest bucket falls back to eager steps.
"""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.platform import make_platform
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import tiny_target

pytestmark = pytest.mark.cuda

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], [60, 61, 62, 63, 64], [7, 7, 8]]


@pytest.fixture(scope="module")
def setup():
    platform = make_platform("cuda")
    torch.manual_seed(0)
    target, _ = tiny_target("qwen3", dtype=torch.float32)
    return platform, target.to(platform.device)


def engines(setup, kind, k=3):
    """An eager and a graphed engine over one target, each with its own copy of the drafter
    (a drafter's caches belong to the engine that attached it)."""
    platform, target = setup

    def drafter():
        return create_drafter(kind, target, seed=1).to(platform.device) if kind else None

    kw = dict(num_speculative_tokens=k, max_model_len=64, max_batch_size=4, platform=platform)
    return Engine(target, drafter(), graphs=False, **kw), Engine(target, drafter(), graphs=True, graph_buckets=[1, 2, 4], **kw)


@pytest.mark.parametrize("kind", [None, "eagle3", "dflash", "dspark"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_graph_replay_gives_the_eager_tokens(setup, kind, temperature, batch):
    eager, graphed = engines(setup, kind)
    assert graphed.runner.graph_runner is not None and eager.runner.graph_runner is None
    params = [SamplingParams(temperature=temperature, seed=10 + i, max_tokens=6 + 5 * i, ignore_eos=True)
              for i in range(batch)]
    want = eager.generate(PROMPTS[:batch], params)
    got = graphed.generate(PROMPTS[:batch], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.stats.accepted_lengths for o in got] == [o.stats.accepted_lengths for o in want]
    assert graphed.scheduler.num_used_blocks == 0


def test_a_batch_above_the_largest_bucket_runs_eagerly(setup):
    platform, target = setup
    engine = Engine(target, None, max_model_len=64, max_batch_size=4, platform=platform, graphs=True, graph_buckets=[1, 2])
    eager = Engine(target, None, max_model_len=64, max_batch_size=4, platform=platform, graphs=False)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == \
        [o.token_ids for o in eager.generate(PROMPTS, params)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("batch", [1, 3])
def test_multi_step_graphs_give_the_tokens_of_single_eager_steps(setup, temperature, batch):
    """Plain decoding, 4 steps per replayed launch (engine/multistep.py) against one eager step
    per launch: the same tokens and stats; rows end at different lengths (a batch of 3 pads the
    4-bucket), and launches carried 4 steps (so the comparison is not vacuous)."""
    platform, target = setup
    kw = dict(max_model_len=64, max_batch_size=4, platform=platform)
    eager = Engine(target, None, graphs=False, decode_steps_per_launch=1, **kw)
    graphed = Engine(target, None, graphs=True, graph_buckets=[1, 2, 4], decode_steps_per_launch=4, **kw)
    params = [SamplingParams(temperature=temperature, seed=10 + i, max_tokens=23 - 5 * i, ignore_eos=True)
              for i in range(batch)]
    want = eager.generate(PROMPTS[:batch], params)
    got = graphed.generate(PROMPTS[:batch], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.stats.accepted_lengths for o in got] == [o.stats.accepted_lengths for o in want]
    assert graphed.multistep.launches >= 2 and any(key[4] == 4 for key in graphed.runner.graph_runner.graphs)
    assert graphed.scheduler.num_used_blocks == 0
