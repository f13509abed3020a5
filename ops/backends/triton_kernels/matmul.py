"""Batch-invariant matmul: a row's result never depends on how many rows share the launch.

Why: in bf16, cuBLAS computes the same row differently for M = 1 (a decode step) and
M = K + 1 (a verify step): it picks GEMV or GEMM kernels, tiles and split-K by M, and the
summation order follows. Greedy speculation then flips near-ties and stops being
token-identical to plain decoding (BENCHMARKS.md, "bf16 exactness"). Here every output
element is one program's fp32 sum over K (a compile-time constant: a model has a handful)
in fixed `BLOCK_K` steps, with tensor-core
products of a fixed shape: the tile configuration is chosen from (N, K, dtype, device)
only, never from M, and no split-K. So decode, verify and prefill give a row the same bits,
whatever the other rows hold.

Fast where decoding spends its time: for M <= 16 one row tile covers the whole batch and
the launch is a weight-streaming pass (many narrow column tiles keep every SM reading);
larger M repeats the 16-row tile (the weights then come from L2).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from ._common import device_guard, floats, needs_autograd, rows_2d

logger = logging.getLogger("ops")

BLOCK_M = 16                     # rows per program: fixed, so M never changes a tile's shape
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N,
                   sx_m, sw_n, so_m,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, FP32_MATH: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, col_ok = rows < M, cols < N
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * sx_m + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * sw_n + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if FP32_MATH:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * so_m + cols64[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_config(n: int, k: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """The launch shape for an [N, K] weight: a function of the weight and the device, never
    of the row count (that is the invariance). Column tiles shrink until every multiprocessor
    has at least one to stream; the K step is fixed per dtype."""
    sms = _multiprocessors(device)
    block_n = 128
    while block_n > 16 and triton.cdiv(n, block_n) < sms:
        block_n //= 2
    block_k = 32 if (dtype == torch.float32 or INTERPRETED) else 128
    return {"BLOCK_M": BLOCK_M, "BLOCK_N": block_n, "BLOCK_K": block_k}


@functools.lru_cache(maxsize=None)
def _warn_reference(why: str) -> None:
    logger.warning("ops: linear runs torch.nn.functional.linear (not batch-invariant) for %s", why)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """`ops.linear`. `out` (preallocated [..., N]) and `config` (a tile shape other than
    `tile_config`'s) are for tests; a config that varies with M breaks the invariance, which
    the negative control in tests/ops/test_ops_linear.py relies on."""
    import torch.nn.functional as F

    params = (weight,) if bias is None else (weight, bias)
    if needs_autograd(x, *params):                   # training: autograd needs the reference
        return F.linear(x, weight, bias)
    if (weight.dim() != 2 or x.shape[-1] != weight.shape[1] or not floats(x, *params)
            or weight.dtype != x.dtype or weight.stride(1) != 1
            or (bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()))):
        _warn_reference(f"x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)} "
                        f"stride {weight.stride()}")
        return F.linear(x, weight, bias)
    n, k = weight.shape
    x2 = rows_2d(x, k)
    m = x2.shape[0]
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    out2 = out.view(m, n)
    cfg = config or tile_config(n, k, x.dtype, x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    with device_guard(x):
        _linear_kernel[grid](x2, weight, bias if bias is not None else weight, out2, m, n,
                             x2.stride(0), weight.stride(0), out2.stride(0), K=k,
                             HAS_BIAS=bias is not None, FP32_MATH=x.dtype == torch.float32 or INTERPRETED,
                             num_warps=4, num_stages=3, **cfg)
    return out


linear.batch_invariant = True           # the engine checks this before promising exact speculation
