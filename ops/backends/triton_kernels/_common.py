"""Host-side helpers shared by the launchers."""

from __future__ import annotations

import contextlib

import torch
import triton

MAX_FUSED_COLS = 65536          # a norm row must fit one block (registers); wider rows use the reference
FLOATS = (torch.float32, torch.bfloat16, torch.float16)     # kernels compute in fp32: others use the reference


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: switch to the tensor's when it differs."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def rows_2d(t: torch.Tensor, cols: int) -> torch.Tensor:
    """`t` as [rows, cols] with unit column stride (a view when possible, else a copy)."""
    t2 = t.reshape(-1, cols)
    if cols > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def floats(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in FLOATS for t in tensors)


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """The kernels have no backward: keep autograd graphs on the reference."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def warps_for(elements: int) -> int:
    """Warps per program for a block of `elements` (about 8-16 elements per thread)."""
    if elements <= 1024:
        return 4
    if elements <= 4096:
        return 8
    return 16
