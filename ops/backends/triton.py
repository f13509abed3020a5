"""Triton backend (NVIDIA CUDA): fused kernels for the memory-bound ops.

Imported lazily by `ops.registry` the first time an op runs on a CUDA tensor of the CUDA
platform. Each kernel lives in `ops/backends/triton_kernels/` with a docstring saying why it
exists; this module only registers them. Attention reads K/V in place through the block
table (the reference gathers a contiguous copy first, then runs SDPA).

On import with a GPU present, one tiny kernel is compiled and run: a broken Triton
toolchain (no C compiler, driver/PTX mismatch) then raises RuntimeError here, which the
registry reports once before falling back to the reference ops, instead of failing inside
the first forward.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"triton is not installed ({exc})") from exc

from ops.registry import register

from .triton_kernels import (
    add_rms_norm,
    apply_rotary,
    attention,
    gelu_tanh_and_mul,
    kv_write,
    linear,
    markov_greedy_step,
    markov_head_step,
    rms_norm,
    silu_and_mul,
)

OPS = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "apply_rotary": apply_rotary,
    "silu_and_mul": silu_and_mul,
    "gelu_tanh_and_mul": gelu_tanh_and_mul,
    "kv_write": kv_write,
    "attention": attention,
    "linear": linear,
    "markov_head_step": markov_head_step,
    "markov_greedy_step": markov_greedy_step,
}

for _name, _fn in OPS.items():
    register(_name, "triton")(_fn)


def _probe() -> None:
    """Compile and run one small kernel; raise RuntimeError if the toolchain cannot."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return
    if torch.cuda.is_current_stream_capturing():
        return
    try:
        x = torch.ones(2, 8, device="cuda")
        y = rms_norm(x, torch.ones(8, device="cuda"), 1e-6)
        assert y.shape == x.shape
    except Exception as exc:  # noqa: BLE001 - any toolchain failure means "backend unavailable"
        raise RuntimeError(f"triton kernels do not compile/run here: {type(exc).__name__}: {exc}") from exc


_probe()
