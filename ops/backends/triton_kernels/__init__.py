"""Triton kernels behind `ops.backends.triton`, one op per module.

Each module holds one `@triton.jit` kernel and its host-side launcher. A launcher takes
the reference op's arguments (plus optional preallocated outputs for tests), flattens
leading dimensions, passes strides instead of copying where it can, and mirrors the
reference's dtype promotion and rounding points so bf16 results agree with it.

The launchers only touch the torch and triton APIs, never `torch.cuda` directly beyond
the device guard, so the same code runs on CPU tensors under `TRITON_INTERPRET=1` (the
interpreter tests in tests/ops/test_ops_triton.py).
"""

from .attention import attention
from .gated import gelu_tanh_and_mul, silu_and_mul
from .kv_write import kv_write
from .markov import markov_greedy_step, markov_head_step
from .matmul import linear
from .rms_norm import add_rms_norm, rms_norm
from .rotary import apply_rotary

__all__ = ["rms_norm", "add_rms_norm", "silu_and_mul", "gelu_tanh_and_mul", "apply_rotary", "kv_write", "attention", "linear", "markov_head_step",
           "markov_greedy_step"]
