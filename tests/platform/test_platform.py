"""Device selection and the Platform surface: CPU for real, NPU through the torch_npu test double."""

from __future__ import annotations

import sys

import pytest
import torch

from ascend_dspark.platform import ENV_VAR, detect, make_platform
from ascend_dspark.platform import npu as npu_platform
from ascend_dspark.platform.cpu import CpuPlatform
from ascend_dspark.platform.interface import Graph
from tests.fakes import fake_npu_runtime, fake_torch_npu

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")


@pytest.fixture
def no_torch_npu(monkeypatch):
    """`import torch_npu` fails (as on every non-Ascend host) and nothing is cached."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(npu_platform, "_TORCH_NPU", None)
    monkeypatch.setattr(npu_platform, "_TORCH_NPU_ERROR", None)


@pytest.fixture
def fake_npu(monkeypatch):
    fake_torch_npu.patch_npu_platform(monkeypatch)
    monkeypatch.delenv(ENV_VAR, raising=False)
    with fake_torch_npu.install() as fake:
        yield fake


# -- detection -----------------------------------------------------------------------------
def test_env_selects_cpu(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert isinstance(make_platform(), CpuPlatform)


def test_explicit_spec_beats_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "tpu")
    assert isinstance(make_platform("cpu"), CpuPlatform)


@pytest.mark.parametrize("spec", ["tpu", "npu:x", "cuda:-1"])
def test_unknown_device_names_valid_options(monkeypatch, spec):
    monkeypatch.setenv(ENV_VAR, spec)
    with pytest.raises(ValueError, match=r"cpu.*cuda.*npu"):
        make_platform()


@no_gpu
def test_cuda_without_gpu_says_why(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=r"'cuda'.*unavailable.*torch\.cuda\.is_available\(\) is False"):
        make_platform()


def test_npu_without_torch_npu_says_why(monkeypatch, no_torch_npu):
    monkeypatch.setenv(ENV_VAR, "npu")
    with pytest.raises(RuntimeError, match=r"'npu'.*unavailable.*torch_npu cannot be imported"):
        make_platform()


@no_gpu
def test_autodetect_falls_back_to_cpu(monkeypatch, no_torch_npu):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert detect() == "cpu"
    assert isinstance(make_platform(), CpuPlatform)


def test_autodetect_prefers_npu(fake_npu):
    assert detect() == "npu"
    platform = make_platform()
    assert platform.name == "npu" and platform.dist_backend == "hccl"


# -- CPU platform --------------------------------------------------------------------------
def test_cpu_surface():
    p = CpuPlatform()
    assert p.device == torch.device("cpu") and p.default_dtype() == torch.float32
    assert p.dist_backend == "gloo" and not p.supports_graphs
    assert p.stream() is None and p.current_stream() is None
    with p.stream_context(p.stream()):
        p.synchronize()
    assert "cpu" in p.describe()
    p.empty_cache()
    assert {"allocated_bytes", "reserved_bytes", "peak_allocated_bytes", "total_bytes"} <= set(p.memory_stats())


def test_cpu_graph_is_eager():
    calls = []
    g = CpuPlatform().graph()
    assert isinstance(g, Graph)
    with pytest.raises(RuntimeError, match="before capture"):
        g.replay()
    assert g.capture(lambda: calls.append(1) or "out") == "out"
    g.replay()
    g.replay()
    assert len(calls) == 3
    g.reset()
    with pytest.raises(RuntimeError):
        g.replay()


def test_cpu_events_time_on_host():
    p = CpuPlatform()
    start, end = p.event(enable_timing=True), p.event(enable_timing=True)
    start.record()
    sum(range(1000))
    end.record()
    end.synchronize()
    assert end.query() and start.elapsed_time(end) >= 0.0


def test_cpu_manual_seed_is_reproducible():
    p = CpuPlatform()
    p.manual_seed(7)
    a = torch.rand(3)
    p.manual_seed(7)
    assert torch.equal(a, torch.rand(3))


# -- NPU platform on the test double -------------------------------------------------------
def test_npu_surface(fake_npu):
    p = npu_platform.NpuPlatform(0)
    assert p.supports_graphs and p.device == torch.device("cpu")  # patched: the double stays on CPU
    assert fake_npu_runtime.DEVICE_NAME in p.describe()
    p.synchronize()
    side = p.stream()
    assert isinstance(side, fake_npu_runtime.Stream) and side is not p.current_stream()
    with p.stream_context(side):
        assert p.current_stream() is side
    p.manual_seed(11)
    assert fake_npu.runtime.seed == 11
    stats = p.memory_stats()
    assert set(stats) == {"allocated_bytes", "reserved_bytes", "peak_allocated_bytes", "total_bytes", "free_bytes"}
    assert stats["total_bytes"] >= stats["free_bytes"] > 0
    p.empty_cache()
    start, end = p.event(enable_timing=True), p.event(enable_timing=True)
    start.record()
    end.record()
    assert start.elapsed_time(end) >= 0.0


def test_npu_graph_capture_and_replay_go_through_npugraph(fake_npu):
    p = npu_platform.NpuPlatform(0)
    static_x = torch.zeros(4)
    weight = torch.arange(4.0)
    runs = []

    def step():
        runs.append(1)
        return static_x * weight + 1

    g = p.graph()
    out = g.capture(step, warmup=2)
    assert len(runs) == 3  # 2 warmups on the side stream + 1 captured run
    assert torch.equal(out, torch.ones(4)), "capture computes nothing: capture() replays once"

    static_x.copy_(torch.full((4,), 2.0))  # new input goes INTO the captured buffer
    g.replay()
    assert len(runs) == 3, "replay must re-run the recorded ops, not call Python again"
    assert torch.equal(out, 2 * weight + 1)

    npu_graph = g._graph
    assert isinstance(npu_graph, fake_npu_runtime.NPUGraph)
    assert [e[0] for e in npu_graph.events] == ["capture_begin", "capture_end", "replay", "replay"]
    assert npu_graph.events[0][1]["pool"] == p._pool  # one shared pool for all graphs
    log = [e[0] for e in fake_npu.runtime.log]
    assert log.index("wait_stream") < log.index("synchronize")  # warmup joined before capture
    g.reset()
    assert npu_graph.events[-1][0] == "reset"
    with pytest.raises(RuntimeError, match="completed capture"):
        g.replay()


def test_npu_graphs_share_one_pool(fake_npu):
    p = npu_platform.NpuPlatform(0)
    a, b = p.graph(), p.graph()
    a.capture(lambda: torch.ones(2) * 2)
    b.capture(lambda: torch.ones(2) * 3)
    assert a._graph.pool() == b._graph.pool() == p._pool
