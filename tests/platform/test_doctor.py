"""`ascend-dspark doctor` in the three states of torch_npu a user meets: absent (this host),
installed without CANN (simulated: its import raises what the real wheel raises when
libhccl.so cannot be loaded), and present (the fake_torch_npu TEST DOUBLE, on a SoC).

Expected lines are written out here, not computed with diagnose.py's helpers."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import pytest
import torch

from ascend_dspark import cli, platform
from ascend_dspark.platform import diagnose
from ascend_dspark.platform import npu as npu_platform
from ops import registry
from tests.fakes import fake_torch_npu

NO_CANN = "libhccl.so: cannot open shared object file: No such file or directory"
TORCH_RELEASE = torch.__version__.split("+")[0]          # e.g. 2.13.0


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No setting of the host leaks in; CANN lives where a test puts it (nowhere by default)."""
    for name in ("TASK_QUEUE_ENABLE", "ASCEND_LAUNCH_BLOCKING", "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH",
                 platform.ENV_VAR, registry.ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(diagnose, "DEFAULT_CANN_HOME", str(tmp_path / "no-cann"))
    monkeypatch.setattr(npu_platform, "_TORCH_NPU", None)
    monkeypatch.setattr(npu_platform, "_TORCH_NPU_ERROR", None)
    monkeypatch.setattr(platform, "_current", platform._current)


@pytest.fixture
def install(monkeypatch):
    """install(soc_version, release=None) -> the double, NpuPlatform on CPU tensors."""
    fake_torch_npu.patch_npu_platform(monkeypatch)
    installed = []

    def go(soc_version: int = 223, release: str | None = None):
        fake = fake_torch_npu.install(soc_version=soc_version, release=release)
        installed.append(fake)
        fake_torch_npu.unload_backend("npu")
        return fake

    yield go
    for fake in installed:
        fake.uninstall()
    fake_torch_npu.unload_backend("npu")


def cann_at(tmp_path, monkeypatch, version: str = "8.1.RC1"):
    home = tmp_path / "ascend-toolkit" / "latest"
    (home / "aarch64-linux").mkdir(parents=True)
    (home / "aarch64-linux" / "ascend_toolkit_install.info").write_text(f"package_name=Ascend-cann-toolkit\n"
                                                                         f"version={version}\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(home))
    return home


def doctor(capsys, *argv: str) -> tuple[int, list[str]]:
    code = cli.main(["doctor", *argv])
    return code, capsys.readouterr().out.splitlines()


# -- torch_npu absent ----------------------------------------------------------------------------
def test_without_torch_npu_doctor_diagnoses_a_cpu_host(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)          # absent, whatever this host has
    code, lines = doctor(capsys)
    assert code == 0
    assert lines[0] == f"ok   torch: torch {torch.__version__}"
    assert "--   torch_npu: not installed (no Ascend NPU support on this host)" in lines
    assert any(line.startswith("--   device npu: unavailable: torch_npu cannot be imported") for line in lines)
    assert "--   graphs: cpu has no device graphs: steps run eagerly" in lines
    assert lines[-1] == "detected: cpu" and not any(line.startswith("FAIL") for line in lines)


def test_cann_without_torch_npu_is_a_warning(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_npu", None)          # absent, whatever this host has
    cann_at(tmp_path, monkeypatch, "8.2.RC1")
    code, lines = doctor(capsys)
    assert code == 0
    line = next(line for line in lines if line.startswith("warn torch_npu:"))
    assert "not installed, but CANN 8.2.RC1" in line and "pip install torch-npu" in line


def test_capture_breaking_settings_are_flagged(capsys, monkeypatch):
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
    monkeypatch.setenv("ASCEND_LAUNCH_BLOCKING", "1")
    code, lines = doctor(capsys)
    assert code == 0                                                       # a warning, not a failure
    assert any(line.startswith("warn env TASK_QUEUE_ENABLE: TASK_QUEUE_ENABLE=2 breaks NPU graph capture")
               for line in lines)
    assert any(line.startswith("warn env ASCEND_LAUNCH_BLOCKING: ASCEND_LAUNCH_BLOCKING=1") for line in lines)
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "1")                           # the harmless level
    monkeypatch.delenv("ASCEND_LAUNCH_BLOCKING")
    assert not any("env" in line for line in doctor(capsys)[1])


# -- torch_npu installed, CANN missing (simulated) -------------------------------------------------
class WithoutCann(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torch_npu is installed, but loading it fails on CANN's missing shared library, as the
    real wheel does without `source set_env.sh`."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch_npu":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(NO_CANN)


def test_torch_npu_without_cann_is_one_clear_failure(capsys, monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [WithoutCann(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    code, lines = doctor(capsys)
    assert code == 1
    line = next(line for line in lines if line.startswith("FAIL torch_npu:"))
    assert "torch_npu is installed but CANN is not found" in line and "set_env.sh" in line and NO_CANN in line
    assert "--   CANN: CANN not found" in lines
    assert lines[-1] == "detected: cpu"                           # the rest of the diagnosis still runs


def test_import_torch_failing_is_diagnosed_not_a_traceback(capsys, monkeypatch):
    """With torch_npu's autoload, `import torch` itself fails without CANN: the parser still
    builds (without the commands that need torch) and doctor says why."""
    monkeypatch.setattr(cli, "_torch_import_error", lambda: f"ImportError: {NO_CANN}")
    code, lines = doctor(capsys)
    assert code == 1
    assert lines[0] == f"FAIL torch: `import torch` fails: ImportError: {NO_CANN}"
    assert "CANN is not found" in lines[1] and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in lines[1]


# -- torch_npu present (the double) ---------------------------------------------------------------
def test_on_a_910b_doctor_reports_soc_versions_ops_and_graphs(capsys, monkeypatch, tmp_path, install):
    fake = install(223)
    monkeypatch.setattr(fake.module, "__version__", f"{TORCH_RELEASE}.post1")   # a torch_npu built for this torch
    home = cann_at(tmp_path, monkeypatch)
    code, lines = doctor(capsys)
    assert code == 0, lines
    assert f"ok   torch_npu: torch_npu {TORCH_RELEASE}.post1 (TEST DOUBLE: tests/fakes)" in lines
    assert f"ok   torch/torch_npu: torch {torch.__version__} pairs with torch_npu {TORCH_RELEASE}.post1" in lines
    assert f"ok   CANN: CANN 8.1.RC1 at {home}" in lines
    assert "ok   device npu: available" in lines
    assert "ok   soc: Ascend910B3 (Atlas A2 (Ascend910B), SoC 223): bfloat16, the fused torch_npu kernels" in lines
    assert "ok   graph API: NPUGraph, graph task groups and task updates present" in lines
    assert "ok   graphs: whole decode steps are captured and replayed as device graphs" in lines
    for op in ("rms_norm", "add_rms_norm", "silu_and_mul", "apply_rotary", "kv_write", "attention", "top_k_top_p"):
        assert f"ok   op {op}: npu" in lines
    assert not any(line.startswith(("warn", "FAIL")) for line in lines)
    assert lines[-1] == "detected: npu"


def test_torch_npu_built_for_another_torch_fails(capsys, monkeypatch, install):
    other = "2.7.1.post2" if not TORCH_RELEASE.startswith("2.7.") else "2.6.0.post3"
    fake = install(223)
    monkeypatch.setattr(fake.module, "__version__", other)
    code, lines = doctor(capsys)
    assert code == 1
    line = next(line for line in lines if line.startswith("FAIL torch/torch_npu:"))
    assert f"torch_npu {other} needs torch {other[:5]}, torch is {torch.__version__}" in line


def test_an_old_release_shows_the_refused_op(capsys, install):
    install(223, release="2.6.0")
    lines = doctor(capsys)[1]
    assert any(line.startswith("warn refused kv_write: runs the reference: torch_npu 2.6.0 has no "
                               "npu_scatter_pa_kv_cache") for line in lines)
    assert any(line.startswith("--   adapted top_k_top_p:") for line in lines)


def test_a_910a_is_told_it_gets_the_reference_ops_in_fp16(capsys, install):
    install(102)
    lines = doctor(capsys)[1]
    assert any(line.startswith("warn soc: Ascend910A (Ascend910 (first generation), SoC 102): float16, "
                               "the reference ops") for line in lines)
    assert not any(line.startswith("ok   op ") for line in lines)


def test_selftest_prints_every_kernel_and_a_bug_report(capsys, monkeypatch, install):
    fake = install(223)
    monkeypatch.setattr(fake.module, "__version__", f"{TORCH_RELEASE}")
    code, lines = doctor(capsys, "--selftest")
    assert code == 0, lines
    for op in ("rms_norm", "add_rms_norm", "silu_and_mul", "apply_rotary", "kv_write", "attention", "top_k_top_p"):
        assert f"ok   selftest op {op}: npu kernel matches the reference" in lines
    assert "ok   selftest graph: capture, length update and replay match the reference" in lines
    block = lines[lines.index("---- paste this into a bug report ----"):]
    assert f"torch: {torch.__version__}" in block and f"torch_npu: {TORCH_RELEASE} (TEST DOUBLE: tests/fakes)" in block
    assert "soc: Ascend910B3 (Atlas A2 (Ascend910B), SoC 223)" in block and "CANN: unknown" in block
    assert "self-test: 7 kernels, switched to the reference: none; graphs: pass" in block
    assert "problems: none" in block and block[-1] == "---- end ----"


def test_selftest_failures_show_in_the_report(capsys, monkeypatch, install):
    fake = install(223)
    monkeypatch.setattr(fake.module, "__version__", f"{TORCH_RELEASE}")
    monkeypatch.setattr(fake.module, "npu_swiglu", lambda input, dim=-1: torch.zeros_like(input.chunk(2, dim)[0]))
    code, lines = doctor(capsys, "--selftest")
    assert code == 0                                       # the reference runs instead: slower, still right
    line = next(line for line in lines if line.startswith("warn selftest op silu_and_mul:"))
    assert "switched to the reference: npu kernel: differs from the reference" in line
    block = lines[lines.index("---- paste this into a bug report ----"):]
    assert "self-test: 7 kernels, switched to the reference: silu_and_mul; graphs: pass" in block
    assert any(line.startswith("  warn selftest op silu_and_mul") for line in block)


# -- the pure parts ------------------------------------------------------------------------------
@pytest.mark.parametrize("torch_version, torch_npu_version, status", [
    ("2.6.0+cpu", "2.6.0", "ok"), ("2.6.0", "2.6.0.post5", "ok"), ("2.7.1+cpu", "2.7.1.post10", "ok"),
    ("2.7.0", "2.7.1.post2", "fail"), ("2.8.0", "2.6.0.post3", "fail"), ("2.6.0", "unknown", "warn"),
])
def test_torch_and_torch_npu_pairing(torch_version, torch_npu_version, status):
    assert diagnose.pairing(torch_version, torch_npu_version).status == status


def test_cann_version_from_its_install_records(tmp_path):
    assert diagnose.cann_version(None) is None and diagnose.cann_version(tmp_path) is None
    (tmp_path / "version.cfg").write_text("runtime_running_version=[7.0.0.5.242:7.0.RC1]\n")
    assert diagnose.cann_version(tmp_path) == "7.0.0.5.242"
    (tmp_path / "x86_64-linux").mkdir()
    (tmp_path / "x86_64-linux" / "ascend_toolkit_install.info").write_text("version=8.0.RC3\ninnerversion=V1\n")
    assert diagnose.cann_version(tmp_path) == "8.0.RC3"


def test_check_rejects_an_unknown_status():
    with pytest.raises(ValueError, match="status"):
        diagnose.Check("x", "maybe", "")
