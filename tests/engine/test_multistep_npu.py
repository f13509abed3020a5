"""Multi-step graphs on the NPU platform (torch_npu replaced by its TEST DOUBLE, see
test_npu_end_to_end.py): N plain decode steps captured into one NPU graph, whose fused
attention tasks are re-issued with the launch's hints before each replay, give the tokens of
single eager steps on the CPU reference, for a ragged batch (one padding row in the bucket)
and with a drafter that has fallen asleep (its empty confidences ride along)."""

from __future__ import annotations

import torch
from test_npu_end_to_end import (K, PROMPTS, _build_models_before_the_double, _models, npu,  # noqa: F401
                                 use_npu_in_float32)

from ascend_dspark import platform
from ascend_dspark.engine.engine import SLEEP_AFTER, Engine
from ascend_dspark.engine.step_costs import StepCosts
from ascend_dspark.platform.cpu import CpuPlatform
from ascend_dspark.spec.sampling import SamplingParams
from ops import registry

N = 4
THREE = [*PROMPTS, [60, 61, 62, 63]]
PARAMS = [SamplingParams(temperature=0.0, max_tokens=22, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=4, max_tokens=17, ignore_eos=True),
          SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)]
EXPENSIVE = StepCosts([1, 4], [0, 1, 2, 3], [[1.0, 3.0, 3.5, 4.0]] * 2, padded=False)   # drafting never pays


def _reference(monkeypatch, target, drafter, params=PARAMS, **kw):
    """Single eager steps on the CPU platform, every op the reference."""
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    platform.set_platform(CpuPlatform())
    try:
        engine = Engine(target, drafter, max_model_len=64, max_batch_size=4, decode_steps_per_launch=1, **kw)
        return [o.token_ids for o in engine.generate(THREE, params)]
    finally:
        monkeypatch.delenv(registry.ENV_VAR)


def _multi(target, drafter, **kw) -> Engine:
    return Engine(target, drafter, max_model_len=64, max_batch_size=4, kv_block_size=128, graphs=True,
                  decode_steps_per_launch=N, **kw)


def _count_replays(engine) -> list[int]:
    """Spy on the graph runner: the `steps` of every launch it replayed (not ran eagerly)."""
    replayed, run = [], engine.runner.graph_runner.run

    def counted(*args, steps=1, **kwargs):
        out = run(*args, steps=steps, **kwargs)
        if out is not None:
            replayed.append(steps)
        return out

    engine.runner.graph_runner.run = counted
    return replayed


def test_multi_step_npu_graphs_give_the_single_step_tokens(npu, monkeypatch):  # noqa: F811
    target, _ = _models("qwen3", torch.float32)
    expected = _reference(monkeypatch, target, None)
    use_npu_in_float32(npu, monkeypatch)
    engine = _multi(target, None)
    replayed = _count_replays(engine)
    assert [o.token_ids for o in engine.generate(THREE, PARAMS)] == expected
    assert engine.multistep.launches >= 2 and replayed.count(N) == engine.multistep.launches
    assert engine.scheduler.num_used_blocks == 0


def test_multi_step_npu_graphs_behind_a_sleeping_drafter(npu, monkeypatch):  # noqa: F811
    target, drafter = _models("qwen3", torch.float32)
    kw = dict(num_speculative_tokens=K, step_costs=EXPENSIVE)
    # Greedy rows (a seeded sampled row keeps its depth, so the drafter would never sleep).
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (SLEEP_AFTER + 24, SLEEP_AFTER + 15, SLEEP_AFTER + 10)]
    expected = _reference(monkeypatch, target, drafter, params, **kw)
    use_npu_in_float32(npu, monkeypatch)
    engine = _multi(target, drafter, **kw)
    replayed = _count_replays(engine)
    assert [o.token_ids for o in engine.generate(THREE, params)] == expected
    assert engine.drafter_asleep and engine.multistep.launches >= 1
    assert replayed.count(N) == engine.multistep.launches
