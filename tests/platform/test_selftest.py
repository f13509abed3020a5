"""The platform self-test on the fake_torch_npu TEST DOUBLE: every fused kernel passes as it is;
a kernel made wrong (or raising) is switched to its reference on that platform only; a graph
capture that raises makes the platform run its steps eagerly."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from ascend_dspark import platform
from ascend_dspark.platform import diagnose
from ascend_dspark.platform import npu as npu_platform
from ascend_dspark.platform.cpu import CpuPlatform
from ascend_dspark.platform.selftest import run_selftest
from ops import registry
from ops.registry import OpRegistry
from tests.fakes import fake_torch_npu

FUSED = ["add_rms_norm", "apply_rotary", "attention", "kv_write", "rms_norm", "silu_and_mul", "top_k_top_p"]


@pytest.fixture
def npu(monkeypatch):
    """A fresh NpuPlatform on the double (Ascend910B3, Atlas A2), on CPU tensors."""
    fake_torch_npu.patch_npu_platform(monkeypatch)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(platform, "_current", platform._current)
    fake = fake_torch_npu.install(soc_version=223)
    fake_torch_npu.unload_backend("npu")
    yield fake, npu_platform.NpuPlatform()
    fake.uninstall()
    fake_torch_npu.unload_backend("npu")


def test_every_fused_kernel_and_the_graph_pass(npu):
    _, p = npu
    report = run_selftest(p)
    assert [o.name for o in report.ops] == FUSED
    assert all(o.status == "pass" for o in report.ops), report.ops
    assert report.graph.status == "pass" and report.switched() == {} and report.graphs_eager is None
    assert p.graph_steps and p.supports_graphs and p.graphs_disabled_reason is None
    assert all(p.ops.chosen()[op] == "npu" for op in FUSED) and p.ops.forced() == {}


def test_a_wrong_kernel_is_switched_to_its_reference(npu, monkeypatch, caplog):
    """Negative control: npu_swiglu returning silu(up) * gate (halves swapped) is caught, and
    the platform's silu_and_mul computes silu(gate) * up again, on the reference."""
    fake, p = npu
    monkeypatch.setattr(fake.module, "npu_swiglu", lambda input, dim=-1: F.silu(input.chunk(2, dim)[1])
                        * input.chunk(2, dim)[0])
    with caplog.at_level(logging.WARNING, logger="ops"):
        report = run_selftest(p)
        p.ops.force_reference("silu_and_mul", "again")           # logged once per op, not per call
    assert list(report.switched()) == ["silu_and_mul"] and "differs from the reference" in report.switched()[
        "silu_and_mul"]
    assert [r.getMessage() for r in caplog.records if "silu_and_mul" in r.getMessage()] == [
        f"ops: silu_and_mul -> reference on this platform: {p.ops.forced()['silu_and_mul']}"]
    assert p.ops.chosen()["silu_and_mul"] == "reference" and p.ops.chosen()["rms_norm"] == "npu"
    gate, up = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch.equal(p.ops.silu_and_mul(gate, up), F.silu(gate) * up)
    line = next(c for c in diagnose.op_checks(p) if c.name == "op silu_and_mul")
    assert line.status == "warn" and line.detail.startswith("reference (switched off: npu kernel failed")
    assert report.graph.status == "pass"                     # the graph then runs the others


def test_a_raising_kernel_is_switched_and_named(npu, monkeypatch):
    fake, p = npu

    def broken(input, gamma, epsilon=1e-6):
        raise RuntimeError("EZ9999: Inner Error, aicore exception")

    monkeypatch.setattr(fake.module, "npu_rms_norm", broken)
    report = run_selftest(p)
    assert list(report.switched()) == ["rms_norm"]
    assert "raised RuntimeError: EZ9999" in report.switched()["rms_norm"]
    assert p.ops.chosen()["rms_norm"] == "reference"
    assert report.graph.status == "pass"                     # the graph's rms_norm is the reference now


def test_a_failing_graph_capture_makes_the_platform_run_eagerly(npu, monkeypatch):
    fake, p = npu

    def refuse(stream):
        raise RuntimeError("ACL error 507899: capture not supported")

    monkeypatch.setattr(torch.npu, "graph_task_group_begin", refuse)
    report = run_selftest(p)
    assert report.switched() == {}
    assert report.graph.status == "fail" and "507899" in report.graphs_eager
    assert not p.graph_steps and not p.supports_graphs and "507899" in p.graphs_disabled_reason
    check = next(c for c in diagnose.platform_checks(p) if c.name == "graphs")
    assert check.status == "warn" and "steps run eagerly" in check.detail and "507899" in check.detail


def test_a_replay_without_the_task_update_fails_the_graph(npu, monkeypatch):
    """A graph whose attention lengths are not re-issued before the replay (the double refuses
    to replay stale task groups, as the stale lengths would be wrong on the device)."""
    _, p = npu
    monkeypatch.setattr(npu_platform.NpuGraph, "_update_tasks", lambda self: None)
    report = run_selftest(p)
    assert report.graph.status == "fail" and not p.graph_steps


def test_on_the_cpu_there_is_nothing_to_test():
    p = CpuPlatform()
    report = run_selftest(p)
    assert report.ops == [] and report.graph.status == "skip" and report.switched() == {}
    assert [c.status for c in report.checks()] == ["info", "info"]


def test_force_reference_on_a_registry():
    reg = OpRegistry("cpu", "npu")
    reg.force_reference("rms_norm", "bad kernel")
    assert reg.chosen() == {"rms_norm": "reference"} and reg.forced() == {"rms_norm": "bad kernel"}
    x, w = torch.randn(2, 8), torch.ones(8)
    reg.rms_norm(x, w, 1e-6)
    assert reg.chosen() == {"rms_norm": "reference"}
    with pytest.raises(KeyError):
        reg.force_reference("no_such_op", "")
