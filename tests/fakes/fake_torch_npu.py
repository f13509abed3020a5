"""TEST DOUBLE, not torch_npu: CPU reference kernels behind the REAL schemas read from the snapshot.

Why: there is no Ascend NPU in CI, and installing the real torch_npu without CANN breaks
`import torch`. `install()` puts a fake `torch_npu` module into `sys.modules` and a fake
namespace at `torch.npu`, so the project's NPU code paths run on CPU:

- `torch_npu.<op>` is `torch.ops.npu.<op>`, defined from the schema strings of the pinned
  wheel (tests/platform/torch_npu_2.13.0_contract.json) with torch.library; argument
  binding is therefore the real dispatcher's, kernels are plain torch (fake_npu_ops.py);
- `torch.npu.*` / `torch_npu.npu.*` is fake_npu_runtime.py: real signatures, eager CPU
  work, an NPUGraph that records and replays ops with device-graph semantics.

The SoC is chosen per install (`install(soc_version=...)`, default 223 = Ascend910B3, an
Atlas A2): `torch.npu.get_soc_version()` / `get_device_name()` report it, and a SoC without
bfloat16 (102 Ascend910A, 202 Ascend310P3, ...) rejects every op touching a bf16 tensor
while installed; the fused ops exist on A2/A3 only.

Tensors stay on CPU: the double does not create an "npu" device. `NpuPlatform.device`
returns `torch.device("npu", i)`, which CPU torch rejects, and
`torch.utils.rename_privateuse1_backend("npu")` cannot be undone in a process, so tests
use `patch_npu_platform(monkeypatch)` to make NpuPlatform hand out CPU tensors.

    with fake_torch_npu.install() as fake:
        platform = NpuPlatform()            # after patch_npu_platform(monkeypatch)
        ...
        fake.runtime.log                    # stream / event / task-group calls
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch

from . import fake_npu_ops, fake_npu_runtime

SNAPSHOT_PATH = Path(__file__).resolve().parents[1] / "platform" / "torch_npu_2.13.0_contract.json"
_MISSING = object()


def load_snapshot() -> dict:
    return json.loads(SNAPSHOT_PATH.read_text())


def register_ops() -> dict:
    """Define the snapshot's schemas under torch.ops.npu (idempotent); return the snapshot."""
    snap = load_snapshot()
    fake_npu_ops.register(snap["ops"])
    return snap


def _module_getattr(module_name: str):
    def __getattr__(name):
        raise AttributeError(f"{module_name} (fake_torch_npu TEST DOUBLE) has no {name!r}: it provides only "
                             "what tests/platform/torch_npu_2.13.0_contract.json pins")
    return __getattr__


def build_modules(snap: dict) -> tuple[types.ModuleType, types.ModuleType]:
    """The fake `torch_npu` module and its `torch_npu.npu` (== torch.npu) namespace."""
    npu = types.ModuleType("torch_npu.npu", "TEST DOUBLE of torch_npu.npu (see tests/fakes/fake_torch_npu.py)")
    for name in snap["python_api"]:
        setattr(npu, name, fake_npu_runtime.API[name])
    npu.__getattr__ = _module_getattr("torch_npu.npu")
    module = types.ModuleType("torch_npu", "TEST DOUBLE of torch_npu (see tests/fakes/fake_torch_npu.py)")
    module.__version__ = snap["torch_npu_version"]
    module.__test_double__ = True
    module.npu = npu
    for name in {op.split(".")[0] for op in snap["ops"]}:
        setattr(module, name, getattr(torch.ops.npu, name))  # torch_npu.x IS torch.ops.npu.x
    module.__getattr__ = _module_getattr("torch_npu")
    return module, npu


class FakeTorchNpu:
    """An installed double; use as a context manager or call `uninstall()`."""

    def __init__(self, device_count: int = 1, soc_version: int = fake_npu_runtime.DEFAULT_SOC) -> None:
        snap = register_ops()
        self.module, self.npu = build_modules(snap)
        self.runtime = fake_npu_runtime._Runtime(device_count=device_count, soc_version=soc_version)
        self._saved: dict | None = None
        self._saved_platform = None
        self._dtype_guard = None

    def _install(self) -> "FakeTorchNpu":
        if fake_npu_runtime._RT is not None:
            raise RuntimeError("fake_torch_npu is already installed")
        self._saved = {"torch_npu": sys.modules.get("torch_npu", _MISSING),
                       "torch_npu.npu": sys.modules.get("torch_npu.npu", _MISSING),
                       "torch.npu": getattr(torch, "npu", _MISSING)}
        sys.modules["torch_npu"] = self.module
        sys.modules["torch_npu.npu"] = self.npu
        torch.npu = self.npu
        fake_npu_runtime._RT = self.runtime
        from ascend_dspark import platform

        self._saved_platform = platform._current
        if not self.runtime.has_bf16:
            self._dtype_guard = fake_npu_runtime._SocDtypeGuard()
            self._dtype_guard.__enter__()
        return self

    def _forget_caches(self) -> None:
        """Process-wide state that picked up this double while installed must not outlive it:
        NpuPlatform's cached `import torch_npu`, a global NpuPlatform created by autodetection
        (restored to the platform set before install), and the ops "npu" backend module bound
        to this fake (unloaded, so the registry re-imports it next time)."""
        from ascend_dspark import platform
        from ascend_dspark.platform import npu as npu_platform

        if npu_platform._TORCH_NPU is self.module:
            npu_platform._TORCH_NPU, npu_platform._TORCH_NPU_ERROR = None, None
        if isinstance(platform._current, npu_platform.NpuPlatform):
            platform._current = self._saved_platform
        backend = sys.modules.get("ops.backends.npu")
        if backend is not None and getattr(backend, "torch_npu", None) is self.module:
            from ops import registry

            registry._reset_for_tests("npu")

    def uninstall(self) -> None:
        if self._saved is None:
            return
        if self.runtime.updating is not None:  # a test failed mid-update: drop its dispatch mode
            _group, recorder = self.runtime.updating
            self.runtime.updating = None
            recorder.__exit__(None, None, None)
        if self.runtime.capturing is not None:  # a test failed mid-capture: drop its dispatch mode
            recorder = self.runtime.capturing._recorder
            self.runtime.capturing = None
            recorder.__exit__(None, None, None)
        if self._dtype_guard is not None:
            self._dtype_guard.__exit__(None, None, None)
            self._dtype_guard = None
        for key in ("torch_npu", "torch_npu.npu"):
            if self._saved[key] is _MISSING:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = self._saved[key]
        if self._saved["torch.npu"] is _MISSING:
            if hasattr(torch, "npu"):
                del torch.npu
        else:
            torch.npu = self._saved["torch.npu"]
        fake_npu_runtime._RT = None
        self._saved = None
        self._forget_caches()

    def __enter__(self) -> "FakeTorchNpu":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install(device_count: int = 1, soc_version: int = fake_npu_runtime.DEFAULT_SOC) -> FakeTorchNpu:
    """Install now; the returned object uninstalls on `uninstall()` or at the end of a `with`."""
    return FakeTorchNpu(device_count, soc_version)._install()


def patch_npu_platform(monkeypatch) -> None:
    """Let ascend_dspark's NpuPlatform run on the double: CPU device, fresh torch_npu import.

    NpuPlatform caches the result of `import torch_npu`; drop it so the fake is picked up,
    and report CPU as its device because CPU torch cannot make `torch.device("npu")`.
    """
    from ascend_dspark.platform import npu as npu_platform

    monkeypatch.setattr(npu_platform, "_TORCH_NPU", None)
    monkeypatch.setattr(npu_platform, "_TORCH_NPU_ERROR", None)
    monkeypatch.setattr(npu_platform.NpuPlatform, "device", property(lambda self: torch.device("cpu")))


def set_enforce_hw_constraints(monkeypatch, enabled: bool) -> None:
    """Relax (or restore) the documented A2/A3 limits for a test, e.g. tiny head dims."""
    monkeypatch.setattr(fake_npu_ops, "ENFORCE_HW_CONSTRAINTS", enabled)
