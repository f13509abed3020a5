"""Step graphs that cannot be captured, or would be one too many, run eagerly: the engine
starts and gives the same tokens. On the NPU platform through the torch_npu TEST DOUBLE
(test_npu_end_to_end.py), whose graphs capture, update and replay like the device's."""

from __future__ import annotations

import pytest
import torch
from test_npu_end_to_end import (GREEDY, K, PROMPTS, _build_models_before_the_double, _models,  # noqa: F401
                                 npu, reference_tokens, use_npu_in_float32)

from ascend_dspark.engine import graph_runner, prefill_graphs
from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams


def _engine(target, drafter) -> Engine:
    return Engine(target, drafter, num_speculative_tokens=K, max_model_len=64, max_batch_size=2,
                  kv_block_size=128, graphs=True)


def test_a_failed_capture_runs_that_bucket_eagerly(npu, monkeypatch, caplog):  # noqa: F811
    target, drafter = _models("qwen3", torch.float32)
    expected = reference_tokens(monkeypatch, target, drafter)
    use_npu_in_float32(npu, monkeypatch)
    real_capture = graph_runner.StepGraphRunner._capture
    attempts = []

    def capture_refusing_bucket_2(self, key, sampling):
        attempts.append(key)
        if key[0] == 2:
            raise RuntimeError("Cannot run aclop operators during NPU graph capture: aten::__rshift__")
        return real_capture(self, key, sampling)

    monkeypatch.setattr(graph_runner.StepGraphRunner, "_capture", capture_refusing_bucket_2)
    with caplog.at_level("WARNING", logger=graph_runner.logger.name):
        engine = _engine(target, drafter)                  # start-up survives the refusal
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert got == expected
    runner = engine.runner.graph_runner
    assert {key[0] for key in runner.graphs} == {1} and {key[0] for key in runner.eager} == {2}
    refused = [r.getMessage() for r in caplog.records if "runs eagerly" in r.getMessage()]
    assert len(refused) == len(runner.eager) and all("bucket 2" in m and "__rshift__" in m for m in refused)
    assert sum(key[0] == 2 for key in attempts) == len(runner.eager)        # never retried


def test_graphs_past_the_cap_run_eagerly(npu, monkeypatch, caplog):  # noqa: F811
    target, drafter = _models("qwen3", torch.float32)
    expected = reference_tokens(monkeypatch, target, drafter)
    use_npu_in_float32(npu, monkeypatch)
    monkeypatch.setattr(graph_runner, "MAX_GRAPHS", 1)
    with caplog.at_level("WARNING", logger=graph_runner.logger.name):
        engine = _engine(target, drafter)
        got = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert got == expected and len(engine.runner.graph_runner.graphs) == 1
    assert "graph cache is full" in caplog.text


def test_top_k_values_in_one_kernel_class_share_a_graph(npu, monkeypatch):  # noqa: F811
    """The key holds the class of the top-k bounds a kernel's range check sees, not the raw
    values: new top-k settings do not capture new graphs while serving."""
    target, drafter = _models("qwen3", torch.float32)
    use_npu_in_float32(npu, monkeypatch)
    engine = _engine(target, drafter)
    before = set(engine.runner.graph_runner.graphs)
    for top_k in (5, 50, 700):
        engine.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=top_k, seed=3, max_tokens=4, ignore_eos=True))
    added = set(engine.runner.graph_runner.graphs) - before
    assert len(added) == 1, added          # batch 2 only, top-k on, every k in 1..1024: one class


def test_each_step_graph_shares_one_attention_workspace(npu, monkeypatch):  # noqa: F811
    """Every fused-attention task of a step graph, and of a prefill graph, gets the same
    workspace (the largest asked for), not one per attention call."""
    target, drafter = _models("qwen3", torch.float32)
    use_npu_in_float32(npu, monkeypatch)
    fia = npu.module.npu_fused_infer_attention_score
    seen: dict[int, set[int]] = {}
    real_out = fia.out

    def out(*args, workspace=None, **kwargs):
        seen.setdefault(len(seen_graphs), set()).add(id(workspace))
        return real_out(*args, workspace=workspace, **kwargs)

    seen_graphs: list[object] = []
    real_capture = graph_runner.StepGraphRunner._capture

    def capture(self, key, sampling):
        seen_graphs.append(key)
        return real_capture(self, key, sampling)

    real_prefill_capture = prefill_graphs.PrefillGraphRunner._capture

    def prefill_capture(self, key, sampling):
        seen_graphs.append(key)
        return real_prefill_capture(self, key, sampling)

    monkeypatch.setattr(fia, "out", out)
    monkeypatch.setattr(graph_runner.StepGraphRunner, "_capture", capture)
    monkeypatch.setattr(prefill_graphs.PrefillGraphRunner, "_capture", prefill_capture)
    engine = _engine(target, drafter)
    graphs = [*engine.runner.graph_runner.graphs.values(), *engine.runner.prefill_graphs.graphs.values()]
    assert len(graphs) == len(seen_graphs) >= 4
    assert len(engine.runner.prefill_graphs.graphs) >= 2               # on by default
    assert all(len(ids) == 1 for ids in seen.values()), seen          # per graph: one workspace
    assert all(c.graph._workspace is not None for c in graphs)
