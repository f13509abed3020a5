"""Hardware abstraction: pick the device once, ask it for everything device-specific.

Detection order is NPU > CUDA > CPU. `ASCEND_DSPARK_DEVICE` (or an explicit `device=`)
overrides it with `cpu`, `cuda`, `cuda:N`, `npu` or `npu:N`; asking for a device that is
not usable raises an error naming the reason instead of silently falling back.
"""

from __future__ import annotations

import logging
import os

import torch

from .cpu import CpuPlatform
from .interface import Graph, HostEvent, Platform
from .npu import npu_unavailable_reason

logger = logging.getLogger(__name__)

ENV_VAR = "ASCEND_DSPARK_DEVICE"
KINDS = ("cpu", "cuda", "npu")

_current: Platform | None = None


def _parse(spec: str) -> tuple[str, int]:
    kind, _, index = spec.strip().lower().partition(":")
    if kind not in KINDS or (index and not index.isdigit()):
        raise ValueError(f"unknown device {spec!r}: expected one of cpu, cuda[:N], npu[:N]")
    return kind, int(index or 0)


def unavailable_reason(kind: str) -> str | None:
    """None when a device kind can be used here, else a human-readable reason."""
    if kind == "cpu":
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no NVIDIA GPU or a CPU-only torch build)"
        return None
    if kind == "npu":
        return npu_unavailable_reason()
    raise ValueError(f"unknown device kind {kind!r}")


def detect() -> str:
    """The best device kind present: NPU > CUDA > CPU."""
    for kind in ("npu", "cuda"):
        if unavailable_reason(kind) is None:
            return kind
    return "cpu"


def make_platform(spec: str | None = None) -> Platform:
    """Build the platform for `spec` (or the env override, or autodetection)."""
    spec = spec or os.environ.get(ENV_VAR) or detect()
    kind, index = _parse(spec)
    reason = unavailable_reason(kind)
    if reason is not None:
        raise RuntimeError(f"device {spec!r} requested but unavailable: {reason}")
    if kind == "cuda":
        from .cuda import CudaPlatform

        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return CudaPlatform(index)
    if kind == "npu":
        from .npu import NpuPlatform

        return NpuPlatform(index)
    return CpuPlatform()


def current_platform() -> Platform:
    """The process-wide platform, created on first use."""
    global _current
    if _current is None:
        _current = make_platform()
        logger.info("platform: %s", _current.describe())
    return _current


def set_platform(platform: Platform) -> Platform:
    global _current
    _current = platform
    return platform


__all__ = ["Platform", "Graph", "HostEvent", "current_platform", "set_platform", "make_platform",
           "detect", "unavailable_reason", "ENV_VAR"]
