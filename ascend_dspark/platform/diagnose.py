"""What `ascend-dspark doctor` checks: a diagnosis of this host, as plain data.

A user whose NPU "does not work" needs the reason, not a list of facts: torch_npu installed
but CANN not sourced, a torch_npu built for another torch, a SoC without the fused kernels,
an environment setting that breaks graph capture. Each check is one `Check` (name, status,
detail); `diagnose()` runs them all and the command prints one line per check. Statuses:
"ok", "warn" (works, but not as well as it could), "fail" (what the user asked for cannot
run; the command exits non-zero) and "info" (a fact, nothing to fix: a device this host
does not have).

Nothing here raises for a broken installation: a failure to import or to build the
platform is itself a check. Device specifics stay in this package (platform/npu.py owns
the torch_npu import and the SoC table; this module only reads them).
"""

from __future__ import annotations

import importlib.util
import os
import platform as host
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ops.registry import IMPLS, REFERENCE
from ops.registry import ENV_VAR as OPS_ENV_VAR

from . import ENV_VAR as DEVICE_ENV_VAR
from . import make_platform, npu, unavailable_reason
from .interface import Platform

STATUSES = ("ok", "warn", "fail", "info")
DEFAULT_CANN_HOME = "/usr/local/Ascend/ascend-toolkit/latest"
SET_ENV_HINT = ("source the CANN environment first: `source /usr/local/Ascend/ascend-toolkit/set_env.sh` "
                "(or your install's set_env.sh)")
# Messages of a torch_npu import that failed because CANN's shared libraries are not on the
# loader path (libhccl.so, libascendcl.so, libruntime.so ... cannot be opened).
_MISSING_LIBRARY = re.compile(r"lib\w+\.so|cannot open shared object|ascend|cann|set_env", re.IGNORECASE)
# Environment settings that break NPU graph capture (torch_npu refuses to capture with the
# task queue's second level; a blocking launch synchronises inside the capture).
CAPTURE_BREAKERS = {
    "TASK_QUEUE_ENABLE": ("2", "TASK_QUEUE_ENABLE=2 breaks NPU graph capture (torch_npu refuses it): "
                               "unset it or set TASK_QUEUE_ENABLE=1"),
    "ASCEND_LAUNCH_BLOCKING": ("1", "ASCEND_LAUNCH_BLOCKING=1 makes every launch synchronous: graph capture "
                                    "fails and eager steps are slow; unset it (it is for debugging)"),
}


@dataclass(frozen=True)
class Check:
    """One line of the diagnosis: `name` what was checked, `status` one of STATUSES."""

    name: str
    status: str
    detail: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check status must be one of {STATUSES}, got {self.status!r}")

    def line(self) -> str:
        prefix = {"ok": "ok  ", "warn": "warn", "fail": "FAIL", "info": "--  "}[self.status]
        return f"{prefix} {self.name}: {self.detail}"


@dataclass
class Diagnosis:
    """Every check, the versions a bug report needs, and the platform built (None when none
    could be), so that a self-test can run on it."""

    checks: list[Check] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]


# -- pure checks (tested on their own) ----------------------------------------------------
def release_of(version: str) -> tuple[int, ...]:
    """The leading X.Y.Z numbers of a version string: '2.6.0.post3' and '2.6.0+cpu' -> (2, 6, 0)."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(n) for n in numbers.group(0).split(".")[:3]) if numbers else ()


def pairing(torch_version: str, torch_npu_version: str) -> Check:
    """torch_npu X.Y.Z[.postN] is built against torch X.Y.Z only (its version string says which):
    any other torch fails at import or, worse, at the first op."""
    want, have = release_of(torch_npu_version), release_of(torch_version)
    if not want:
        return Check("torch/torch_npu", "warn", f"cannot read torch_npu's version {torch_npu_version!r}")
    needed = ".".join(map(str, want))
    if want != have:
        return Check("torch/torch_npu", "fail", f"torch_npu {torch_npu_version} needs torch {needed}, "
                                                f"torch is {torch_version}: install matching versions "
                                                f"(pip install torch=={needed} torch-npu=={torch_npu_version})")
    return Check("torch/torch_npu", "ok", f"torch {torch_version} pairs with torch_npu {torch_npu_version}")


def explain_import_error(error: str) -> str:
    """What a failed `import torch_npu` means for the user."""
    if _MISSING_LIBRARY.search(error):
        return f"torch_npu is installed but CANN is not found: {SET_ENV_HINT} ({error})"
    return f"torch_npu is installed but cannot be imported ({error})"


def environment_checks(environ: dict[str, str]) -> list[Check]:
    """The settings that change what runs: capture breakers (warn) and this project's overrides."""
    checks = []
    for name, (bad, why) in CAPTURE_BREAKERS.items():
        value = environ.get(name)
        if value is not None and value.strip() == bad:
            checks.append(Check(f"env {name}", "warn", why))
    forced = environ.get(OPS_ENV_VAR)
    if forced:
        checks.append(Check(f"env {OPS_ENV_VAR}", "warn", f"{forced!r} sends ops to their plain-torch reference "
                                                         "(debugging setting: slower)"))
    device = environ.get(DEVICE_ENV_VAR)
    if device:
        checks.append(Check(f"env {DEVICE_ENV_VAR}", "info", f"device forced to {device!r}"))
    return checks


def cann_home(environ: dict[str, str]) -> Path | None:
    """Where CANN's toolkit is: what set_env.sh exports, else the default install path."""
    for name in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        if environ.get(name):
            return Path(environ[name])
    default = Path(DEFAULT_CANN_HOME)
    return default if default.is_dir() else None


def cann_version(home: Path | None) -> str | None:
    """CANN's version from its install records (`<arch>-linux/ascend_toolkit_install.info`
    `version=`, else `version.cfg` / `version.info`), None when none is found."""
    if home is None:
        return None
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(host.machine().lower(), host.machine().lower())
    records = (home / f"{arch}-linux" / "ascend_toolkit_install.info",
               *sorted(home.glob("*-linux/ascend_toolkit_install.info")))
    for info in records:
        text = _read(info)
        found = re.search(r"^version=(\S+)", text or "", re.MULTILINE)
        if found:
            return found.group(1)
    for name in ("version.cfg", "version.info"):
        text = _read(home / name)
        found = re.search(r"(\d+\.\d+\.(?:RC\d+|\d+)(?:\.\w+)*)", text or "")
        if found:
            return found.group(1)
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


# -- the diagnosis ---------------------------------------------------------------------------
def diagnose(environ: dict[str, str] | None = None) -> Diagnosis:
    """Every check for this host (torch is importable: the command checked that first)."""
    environ = dict(os.environ if environ is None else environ)
    report = Diagnosis()
    report.versions.update(python=sys.version.split()[0], os=f"{host.system()} {host.machine()}",
                           torch=torch.__version__)
    report.checks.append(Check("torch", "ok", f"torch {torch.__version__}"))
    report.checks += environment_checks(environ)
    npu_checks, npu_imported = _torch_npu_checks(environ, report)
    report.checks += npu_checks
    for kind in ("cuda", "npu"):
        reason = unavailable_reason(kind)
        if reason is None:
            report.checks.append(Check(f"device {kind}", "ok", "available"))
        elif kind == "cuda" or not npu_imported:
            report.checks.append(Check(f"device {kind}", "info", f"unavailable: {reason}"))
        else:                           # torch_npu imports but no NPU is usable: the user wanted one
            report.checks.append(Check(f"device {kind}", "fail", f"unavailable: {reason}"))
    try:
        report.platform = make_platform()
    except (RuntimeError, ValueError) as exc:
        report.checks.append(Check("platform", "fail", str(exc)))
        return report
    report.checks.append(Check("platform", "ok", report.platform.describe()))
    report.checks += platform_checks(report.platform)
    if isinstance(report.platform, npu.NpuPlatform):
        soc = report.platform.soc
        report.versions["soc"] = f"{soc.name} ({soc.family}, SoC {soc.version})"
    return report


def _torch_npu_checks(environ: dict[str, str], report: Diagnosis) -> tuple[list[Check], bool]:
    """torch_npu: absent, installed without CANN, or imported (then its torch pairing, CANN);
    and whether it imported."""
    home = cann_home(environ)
    cann = cann_version(home)
    report.versions["CANN"] = cann or "unknown"
    cann_detail = f"CANN {cann} at {home}" if cann else (f"CANN version unknown (no install record under {home})"
                                                         if home else "CANN not found")
    if not _installed("torch_npu"):
        report.versions["torch_npu"] = "not installed"
        if home is not None:
            return [Check("torch_npu", "warn", f"not installed, but {cann_detail}: pip install "
                                               f"torch-npu matching torch {torch.__version__} for the NPU")], False
        return [Check("torch_npu", "info", "not installed (no Ascend NPU support on this host)")], False
    module, error = npu.load_torch_npu()
    if module is None:
        report.versions["torch_npu"] = "installed, import fails"
        return [Check("torch_npu", "fail", explain_import_error(error)), Check("CANN", "info", cann_detail)], False
    version = str(getattr(module, "__version__", "unknown"))
    double = " (TEST DOUBLE: tests/fakes)" if getattr(module, "__test_double__", False) else ""
    report.versions["torch_npu"] = version + double
    return [Check("torch_npu", "ok", f"torch_npu {version}{double}"), pairing(torch.__version__, version),
            Check("CANN", "ok" if cann else "info", cann_detail + ("" if cann else "; torch_npu imported, so "
                                                                   "its libraries are on the loader path"))], True


def _installed(name: str) -> bool:
    """Whether `import name` finds a module (without importing it: that is the next check)."""
    if sys.modules.get(name) is not None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def platform_checks(platform: Platform) -> list[Check]:
    """What the platform chose: its SoC and dtype (NPU), graphs, and the backend of every op."""
    checks = []
    if isinstance(platform, npu.NpuPlatform):
        checks += _npu_checks(platform)
    if platform.supports_graphs:
        checks.append(Check("graphs", "ok", "whole decode steps are captured and replayed as device graphs"))
    elif platform.graphs_disabled_reason:
        checks.append(Check("graphs", "warn", f"steps run eagerly: {platform.graphs_disabled_reason}"))
    else:
        checks.append(Check("graphs", "info", f"{platform.name} has no device graphs: steps run eagerly"))
    return checks + op_checks(platform)


def _npu_checks(platform: npu.NpuPlatform) -> list[Check]:
    soc = platform.soc
    dtype = str(soc.dtype).removeprefix("torch.")
    where = f"{soc.name} ({soc.family}, SoC {soc.version})"
    checks = [Check("soc", "ok" if soc.fused_ops else "warn",
                    f"{where}: {dtype}, " + ("the fused torch_npu kernels" if soc.fused_ops else
                                             "the reference ops (the fused kernels are documented for "
                                             "Atlas A2/A3 only)"))]
    missing = npu.missing_graph_apis()
    checks.append(Check("graph API", "warn" if missing else "ok",
                        f"torch.npu lacks {', '.join(missing)}" if missing else
                        "NPUGraph, graph task groups and task updates present"))
    module, _ = npu.load_torch_npu()
    if soc.fused_ops and module is not None:
        from ops.backends.npu_caps import Capabilities

        caps = Capabilities.probe(module)
        checks += [Check(f"refused {op}", "warn", f"runs the reference: {why}") for op, why in caps.refused.items()]
        checks += [Check(f"adapted {op}", "info", how) for op, how in caps.adapted.items()]
    return checks


def op_checks(platform: Platform) -> list[Check]:
    """The backend each op resolves to on this platform (resolving imports the backend, as the
    first forward would); ops without a kernel of the platform's backend in one line."""
    registry = platform.ops
    for op in IMPLS:
        registry.resolve(op, platform.device)
    chosen, forced = registry.chosen(), registry.forced()
    checks, plain = [], []
    for op, backend in chosen.items():
        if op in forced:
            checks.append(Check(f"op {op}", "warn", f"reference (switched off: {forced[op]})"))
        elif backend != REFERENCE:
            checks.append(Check(f"op {op}", "ok", backend))
        elif platform.op_backend != REFERENCE and platform.op_backend in IMPLS[op]:
            checks.append(Check(f"op {op}", "warn", f"reference, although a {platform.op_backend} kernel exists "
                                                    f"(backend not loaded, or {OPS_ENV_VAR})"))
        else:
            plain.append(op)
    if plain:
        checks.append(Check("ops on the reference", "info", ", ".join(plain)))
    return checks
