"""What the Ascend backend's modules share: running an op's reference when a torch_npu kernel
cannot take the call (logged once per (op, reason), counted for `fallbacks()`), and the
dtype checks that decide it."""

from __future__ import annotations

import logging

import torch

from ops.activation import silu_and_mul as _silu_and_mul_entry
from ops.attention import attention as _attention_entry
from ops.kv_cache import kv_write as _kv_write_entry
from ops.norm import add_rms_norm as _add_rms_norm_entry
from ops.norm import rms_norm as _rms_norm_entry
from ops.rotary import apply_rotary as _apply_rotary_entry

logger = logging.getLogger("ops")
BACKEND = "npu"

_REFERENCES = {
    "rms_norm": _rms_norm_entry.reference,
    "add_rms_norm": _add_rms_norm_entry.reference,
    "silu_and_mul": _silu_and_mul_entry.reference,
    "apply_rotary": _apply_rotary_entry.reference,
    "kv_write": _kv_write_entry.reference,
    "attention": _attention_entry.reference,
}
_fallbacks: dict[tuple[str, str], int] = {}


def fallbacks() -> dict[tuple[str, str], int]:
    """(op, reason) -> number of calls that ran the reference instead of the torch_npu kernel."""
    return dict(_fallbacks)


def run_reference(op: str, reason: str, *args):
    """Run the reference of `op`, logging the reason the first time (op, reason) is seen."""
    key = (op, reason)
    if key not in _fallbacks:
        _fallbacks[key] = 0
        logger.warning("ops: %s on the NPU runs the reference (plain torch): %s", op, reason)
    _fallbacks[key] += 1
    return _REFERENCES[op](*args)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unsupported_dtype(kernel: str, dtype: torch.dtype, allowed) -> str | None:
    if dtype in allowed:
        return None
    return f"{kernel} takes {'/'.join(map(dtype_name, allowed))}, not {dtype_name(dtype)}"
