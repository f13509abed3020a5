"""The CUDA platform on a real GPU: identity, graph capture/replay, events, memory stats."""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.platform import make_platform

pytestmark = pytest.mark.cuda


def test_cuda_platform_surface():
    platform = make_platform("cuda")
    assert platform.name == "cuda" and platform.dist_backend == "nccl"
    assert platform.default_dtype() == torch.bfloat16
    assert platform.device == torch.device("cuda", 0)
    stats = platform.memory_stats()
    assert stats["total_bytes"] > 0 and {"allocated_bytes", "reserved_bytes", "free_bytes"} <= set(stats)


def test_cuda_graph_replays_on_new_inputs():
    platform = make_platform("cuda")
    x = torch.zeros(1024, device=platform.device)
    out = torch.empty_like(x)
    graph = platform.graph()
    graph.capture(lambda: out.copy_(x * 2 + 1))
    x.copy_(torch.arange(1024, device=platform.device, dtype=torch.float32))
    graph.replay()
    platform.synchronize()
    assert torch.equal(out, x * 2 + 1)


def test_cuda_events_time_device_work():
    platform = make_platform("cuda")
    start, end = platform.event(enable_timing=True), platform.event(enable_timing=True)
    a = torch.randn(2048, 2048, device=platform.device)
    start.record()
    for _ in range(5):
        a = a @ a.T / 2048
    end.record()
    platform.synchronize()
    assert start.elapsed_time(end) > 0
