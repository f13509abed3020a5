"""NpuPlatform on the torch_npu test double: SoC-dependent dtype / ops, and the graph task update.

The SoC is the double's (`fake_torch_npu.install(soc_version=...)`); `torch.npu.get_soc_version()`
returns torch_npu's c10_npu::SocVersion int, as the real wheel does.
"""

from __future__ import annotations

import logging

import pytest
import torch

import ops
from ascend_dspark import platform
from ascend_dspark.platform import npu as npu_platform
from ascend_dspark.platform.interface import Platform
from ops import registry
from tests.fakes import fake_torch_npu


@pytest.fixture
def install(monkeypatch):
    """install(soc_version) -> the installed double, with NpuPlatform patched onto CPU tensors."""
    fake_torch_npu.patch_npu_platform(monkeypatch)
    monkeypatch.delenv(platform.ENV_VAR, raising=False)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(platform, "_current", platform._current)
    installed = []

    def go(soc_version: int = 223):
        fake = fake_torch_npu.install(soc_version=soc_version)
        installed.append(fake)
        fake_torch_npu.unload_backend("npu")
        return fake

    yield go
    for fake in installed:
        fake.uninstall()
    fake_torch_npu.unload_backend("npu")


# -- SoC choice ----------------------------------------------------------------------------
@pytest.mark.parametrize("soc, name", [(220, "Ascend910B1"), (223, "Ascend910B3"), (250, "Ascend910_9391"),
                                       (255, "Ascend910_9362")])
def test_atlas_a2_a3_get_bf16_and_the_fused_ops(install, caplog, soc, name):
    install(soc)
    with caplog.at_level(logging.INFO, logger=npu_platform.__name__):
        p = npu_platform.NpuPlatform()
    assert p.soc.version == soc and p.soc.name == name and p.soc.fused_ops
    assert p.default_dtype() == torch.bfloat16 and p.supports_bf16_autocast
    assert p.op_backend == "npu" and p.kv_block_size == 128
    lines = [r for r in caplog.records if r.name == npu_platform.__name__]
    assert len(lines) == 1 and "bfloat16 and the fused torch_npu kernels" in lines[0].getMessage()
    assert name in p.describe() and "npu ops" in p.describe()


@pytest.mark.parametrize("soc, name, dtype, graphs", [
    (102, "Ascend910A", torch.float16, False),    # first-generation 910: no bf16, none of the fused ops
    (103, "Ascend910ProB", torch.float16, False),
    (202, "Ascend310P3", torch.float16, False),
    (240, "Ascend310B1", torch.float16, False),
    (260, "Ascend950", torch.bfloat16, True),     # has bf16 and graphs; the fused kernels are documented for A2/A3
])
def test_other_socs_get_the_reference_ops_announced_in_one_line(install, caplog, soc, name, dtype, graphs):
    install(soc)
    with caplog.at_level(logging.INFO, logger=npu_platform.__name__):
        p = npu_platform.NpuPlatform()
    assert p.default_dtype() == dtype and p.supports_bf16_autocast == (dtype == torch.bfloat16)
    assert p.op_backend == "reference" and p.kv_block_size == Platform.kv_block_size
    lines = [r for r in caplog.records if r.name == npu_platform.__name__ and "reference ops" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert name in message and f"using {str(dtype)[6:]} and the reference ops" in message
    assert ("no bfloat16" in message) == (dtype == torch.float16)
    # NPU graphs (and the overlap that relies on them) only where the SoC supports them, said once
    assert p.supports_graphs == p.graph_steps == p.overlap_steps == graphs
    assert (p.graphs_disabled_reason is None) == graphs
    said = [r for r in caplog.records if "NPU graphs and overlap off" in r.getMessage()]
    assert len(said) == (0 if graphs else 1)


def test_bfloat16_on_a_soc_without_it_is_a_clear_error(install):
    install(102)
    p = npu_platform.NpuPlatform()
    with pytest.raises(ValueError, match="Ascend910A .* has no bfloat16: use float16"):
        p.check_dtype(torch.bfloat16)
    p.check_dtype(torch.float16)
    p.soc = npu_platform.soc_profile(223)                         # an Atlas A2 has it
    p.check_dtype(torch.bfloat16)


def test_910a_runs_the_engine_ops_on_the_reference_in_fp16(install):
    """On a SoC without the fused kernels nothing reaches torch_npu: every op resolves to the
    reference, in float16 (the double would raise on a fused op or on any bf16 tensor)."""
    fake = install(102)
    p = platform.set_platform(npu_platform.NpuPlatform())
    x = torch.randn(2, 3, 16, dtype=p.default_dtype())
    w = torch.ones(16, dtype=p.default_dtype())
    y = p.ops.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float16 and p.ops.chosen()["rms_norm"] == "reference"
    with pytest.raises(RuntimeError, match="not available on Ascend910A"):
        fake.module.npu_rms_norm(x, w, epsilon=1e-6)
    with pytest.raises(TypeError, match="Ascend910A has no bfloat16"):
        x.to(torch.bfloat16)
    with pytest.raises(TypeError, match="no bfloat16"):
        torch.ones(2, dtype=torch.bfloat16)


def test_the_double_reports_its_soc(install):
    install(250)
    assert torch.npu.get_soc_version() == 250 and torch.npu.get_device_name().startswith("Ascend910_9391")
    torch.ones(2, dtype=torch.bfloat16) * 2                    # A3 has bf16


def test_soc_profile_table():
    assert npu_platform.soc_profile(224).family.startswith("Atlas A2")
    assert npu_platform.soc_profile(253).family.startswith("Atlas A3")
    assert npu_platform.soc_profile(204).family == "Ascend310P" and not npu_platform.soc_profile(204).has_bf16
    unknown = npu_platform.soc_profile(999)
    assert unknown.dtype == torch.float16 and not unknown.fused_ops and unknown.family == "unknown Ascend SoC"


# -- graph task update ----------------------------------------------------------------------
def test_graph_refreshes_its_tasks_before_every_replay(install):
    """NpuGraph.capture_task: the launch runs in a task group inside the capture and is
    re-issued between graph_task_update_begin/end before EVERY replay (including the one
    capture() does), after the update stream waited for the current stream, with the
    ExternalEvent recorded after each update; the double refuses any other order."""
    fake = install(223)
    p = npu_platform.NpuPlatform()
    q = torch.randn(1, 1, 4, 64).half()
    k = torch.randn(1, 8, 2, 64).half()
    lengths = [3]
    outs = []

    def step():
        if not torch.npu.is_current_stream_capturing():
            return fake.module.npu_fused_infer_attention_score(
                q, k, k, actual_seq_lengths_kv=list(lengths), num_heads=4, num_key_value_heads=2, scale=0.125,
                input_layout="BSND")[0]
        out, lse = torch.empty_like(q), torch.empty(1)
        outs.append(out)

        def launch():
            return fake.module.npu_fused_infer_attention_score.out(
                q, k, k, actual_seq_lengths_kv=list(lengths), num_heads=4, num_key_value_heads=2, scale=0.125,
                input_layout="BSND", out=[out, lse])

        g.capture_task(launch)
        return out

    g = p.graph()
    out = g.capture(step)
    assert out is outs[0]

    def expected(n):
        return fake.module.npu_fused_infer_attention_score(
            q, k, k, actual_seq_lengths_kv=[n], num_heads=4, num_key_value_heads=2, scale=0.125,
            input_layout="BSND")[0]

    assert torch.equal(out, expected(3))
    for n in (5, 8, 1):
        lengths[0] = n                   # the host value the next replay's launch reads
        g.replay()
        assert torch.equal(out, expected(n))
    assert [e[0] for e in g._graph.events] == ["capture_begin", "capture_end"] + ["task_update", "replay"] * 4
    log = [e[0] for e in fake.runtime.log]
    first = log.index("task_update_begin")
    assert log[first - 1] == "wait_stream" and log[first + 1:first + 3] == ["task_update_end", "external_record"]
    with pytest.raises(RuntimeError, match="only valid while this graph is capturing"):
        g.capture_task(lambda: None)


def test_a_failed_task_update_closes_its_section(install):
    """A launch that raises during a replay's update still ends the update section, so the
    next replay can update again (the double refuses a begin inside an open section)."""
    install(223)
    p = npu_platform.NpuPlatform()
    failing = [False]

    def launch():
        if failing[0]:
            raise ValueError("bad lengths")

    def step():
        if torch.npu.is_current_stream_capturing():       # capture() also runs it eagerly first
            g.capture_task(launch)

    g = p.graph()
    g.capture(step)
    failing[0] = True
    with pytest.raises(ValueError, match="bad lengths"):
        g.replay()
    failing[0] = False
    g.replay()


def test_task_arguments_are_computed_before_the_update_section_opens(install):
    """`prepare` (the host lengths) runs before graph_task_update_begin: a bad length raises
    with no section open, and `launch` gets what `prepare` computed."""
    fake = install(223)
    p = npu_platform.NpuPlatform()
    lengths, got = [3], []

    def prepare():
        if lengths[0] < 0:
            raise ValueError("negative length")
        fake.runtime.log.append(("prepare", None))
        return (list(lengths),)

    def step():
        if torch.npu.is_current_stream_capturing():
            g.capture_task(got.append, prepare)

    g = p.graph()
    g.capture(step)
    lengths[0] = 7
    g.replay()
    assert got[-1] == [7]
    log = [e[0] for e in fake.runtime.log]
    last = len(log) - 1 - log[::-1].index("prepare")
    assert log[last + 1] == "task_update_begin"
    lengths[0] = -1
    before = len(fake.runtime.log)
    with pytest.raises(ValueError, match="negative length"):
        g.replay()
    assert "task_update_begin" not in [e[0] for e in fake.runtime.log[before:]]


def test_capture_without_replay_would_return_garbage(install):
    """Why NpuGraph.capture() replays: what a capture returns is garbage until a replay."""
    install(223)
    g = torch.npu.NPUGraph()
    x = torch.ones(3)
    with torch.npu.graph(g):
        y = x + 1
    assert y.isnan().all()
    g.replay()
    assert torch.equal(y, torch.full((3,), 2.0))
