"""TEST DOUBLE, not torch_npu: CPU reference kernels behind the REAL schemas read from the snapshot.

Why: there is no Ascend NPU in CI, and installing the real torch_npu without CANN breaks
`import torch`. `install()` puts a fake `torch_npu` module into `sys.modules` and a fake
namespace at `torch.npu`, so the project's NPU code paths run on CPU:

- `torch_npu.<op>` is `torch.ops.npu.<op>`, defined from the schema strings of the newest
  supported wheel (tests/platform/torch_npu_contracts/torch_npu_<newest>.json) with
  torch.library; argument binding is therefore the real dispatcher's, kernels are plain
  torch (fake_npu_ops.py). `install(release="2.6.0")` gives an older release's op set
  instead: its schemas that differ from the newest live in a namespace of their own
  (torch.ops.npu_2_6_0), ops it lacks are absent, `torch_npu.__version__` names it;
- `torch.npu.*` / `torch_npu.npu.*` is fake_npu_runtime.py: real signatures, eager CPU
  work, an NPUGraph that records and replays ops with device-graph semantics; a capture
  refuses the aten ops the release runs only as aclop operators (acl_op_only/<release>.json).

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

from tools import npu_contract
from tools.npu_contract import acl_op_only

from . import fake_npu_ops, fake_npu_runtime

SNAPSHOT_DIR = Path(__file__).resolve().parents[1] / "platform" / "torch_npu_contracts"
SNAPSHOT_PATH = npu_contract.snapshot_path(SNAPSHOT_DIR, npu_contract.NEWEST)
ACL_OP_ONLY_DIR = SNAPSHOT_DIR / "acl_op_only"   # per release: aten ops a capture must not run
_MISSING = object()


def unload_backend(backend: str) -> None:
    """Forget a backend's module and what it registered, so that the next registry which
    wants it re-imports it against whatever `torch_npu` is installed now. Its companion
    modules (`ops.backends.npu_sampling`, `ops.backends.triton_kernels.*`: names extending
    the backend module's) go too, since they register on import."""
    from ops import registry

    for impls in registry.IMPLS.values():
        impls.pop(backend, None)
    module = registry.BACKEND_MODULES[backend]
    for loaded in [m for m in sys.modules if m == module or m.startswith((module + "_", module + "."))]:
        del sys.modules[loaded]
        parent, _, name = loaded.rpartition(".")
        if parent in sys.modules and name in vars(sys.modules[parent]):
            delattr(sys.modules[parent], name)


def load_snapshot(release: str | None = None) -> dict:
    return json.loads(npu_contract.snapshot_path(SNAPSHOT_DIR, release or npu_contract.NEWEST).read_text())


def release_namespace(release: str) -> str:
    return "npu_" + release.replace(".", "_")


def register_ops(release: str | None = None) -> tuple[dict, dict]:
    """Define the schemas under torch.ops (idempotent); return (snapshot, op name -> packet).

    The newest release's ops live in torch.ops.npu. For an older release, an op whose
    schema (any overload) differs from the newest's is defined in torch.ops.npu_<release>."""
    newest = load_snapshot()
    fake_npu_ops.register(newest["ops"])
    snap = load_snapshot(release) if release else newest
    names = {op.split(".")[0] for op in snap["ops"]}

    def overloads(s: dict, name: str) -> dict:
        return {k: v for k, v in s["ops"].items() if k.split(".")[0] == name}

    differ = {n for n in names if overloads(snap, n) != overloads(newest, n)}
    if differ:
        namespace = release_namespace(snap["torch_npu_version"])
        fake_npu_ops.register({k: v for k, v in snap["ops"].items() if k.split(".")[0] in differ}, namespace)
    packets = {n: getattr(getattr(torch.ops, release_namespace(snap["torch_npu_version"]) if n in differ else "npu"), n)
               for n in names}
    return snap, packets


def _module_getattr(module_name: str, release: str):
    def __getattr__(name):
        raise AttributeError(f"{module_name} (fake_torch_npu TEST DOUBLE of torch_npu {release}) has no {name!r}: "
                             "it provides only what tests/platform/torch_npu_contracts/ pins")
    return __getattr__


def build_modules(snap: dict, packets: dict | None = None) -> tuple[types.ModuleType, types.ModuleType]:
    """The fake `torch_npu` module and its `torch_npu.npu` (== torch.npu) namespace."""
    release = snap["torch_npu_version"]
    npu = types.ModuleType("torch_npu.npu", "TEST DOUBLE of torch_npu.npu (see tests/fakes/fake_torch_npu.py)")
    for name in snap["python_api"]:
        setattr(npu, name, fake_npu_runtime.API[name])
    npu.__getattr__ = _module_getattr("torch_npu.npu", release)
    module = types.ModuleType("torch_npu", "TEST DOUBLE of torch_npu (see tests/fakes/fake_torch_npu.py)")
    module.__version__ = release
    module.__test_double__ = True
    module.npu = npu
    for name in {op.split(".")[0] for op in snap["ops"]}:
        # torch_npu.x IS torch.ops.npu.x (an older release's differing op: torch.ops.npu_<release>.x)
        setattr(module, name, packets[name] if packets else getattr(torch.ops.npu, name))
    module.__getattr__ = _module_getattr("torch_npu", release)
    return module, npu


class FakeTorchNpu:
    """An installed double; use as a context manager or call `uninstall()`."""

    def __init__(self, device_count: int = 1, soc_version: int = fake_npu_runtime.DEFAULT_SOC,
                 release: str | None = None) -> None:
        snap, packets = register_ops(release)
        self.release = snap["torch_npu_version"]
        self.module, self.npu = build_modules(snap, packets)
        self.runtime = fake_npu_runtime._Runtime(device_count=device_count, soc_version=soc_version,
                                                 aclop_only=acl_op_only.load_ops(ACL_OP_ONLY_DIR, self.release))
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
            unload_backend("npu")

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


def install(device_count: int = 1, soc_version: int = fake_npu_runtime.DEFAULT_SOC,
            release: str | None = None) -> FakeTorchNpu:
    """Install now (the newest supported release's ops, or `release`'s); the returned object
    uninstalls on `uninstall()` or at the end of a `with`."""
    return FakeTorchNpu(device_count, soc_version, release)._install()


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
