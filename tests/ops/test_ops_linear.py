"""The batch-invariant matmul (ops/backends/triton_kernels/matmul.py) against F.linear.

Runs like test_ops_triton.py: `cuda` on the GPU, `interp` on CPU tensors under Triton's
interpreter in the child process that test_ops_triton.py starts. The oracle for the
invariance tests is the kernel's own output on a different launch (bits must match), and
for values the reference op with plain torch.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import KERNEL_TOL, randn
from test_ops_triton import DEVICES, DTYPES, device, tk  # noqa: F401  (fixtures)

import ops

# (N, K) of real projections: SmolLM2's fused q/k/v, its down projection, an odd shape.
SHAPES = [pytest.param(960, 576, id="qkv"), pytest.param(576, 1536, id="down"), pytest.param(77, 45, id="odd")]


def _rows(device: str) -> tuple[int, ...]:
    """Row counts of a decode step, verify steps (B x (K + 1)) and a prefill chunk."""
    return (1, 3, 8, 17) if device == "cpu" else (1, 3, 8, 16, 17, 64, 129, 520)


def _check_rows_invariant(linear, x: torch.Tensor, w: torch.Tensor, bias, rows: tuple[int, ...],
                          config_for=lambda m: None) -> None:
    """Row i of a launch over x[:m] equals row i of the launch over all of x, bit for bit,
    and does not change when the other rows hold different values."""
    full = linear(x, w, bias, config=config_for(x.shape[0]))
    for m in rows:
        part = linear(x[:m], w, bias, config=config_for(m))
        assert torch.equal(part, full[:m]), f"rows of a {m}-row launch differ from the {x.shape[0]}-row launch"
    other = x.clone()
    other[1:] = randn(*other[1:].shape, dtype=x.dtype, device=x.device) * 100
    assert torch.equal(linear(other, w, bias, config=config_for(x.shape[0]))[0], full[0])


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_the_reference(tk, device, n, k, dtype, with_bias):
    gen = torch.Generator().manual_seed(n + k)
    x = randn(2, 3, k, dtype=dtype, device=device, gen=gen)
    w = randn(n, k, dtype=dtype, device=device, gen=gen) * k ** -0.5
    bias = randn(n, dtype=dtype, device=device, gen=gen) if with_bias else None
    got = tk.linear(x, w, bias, out=torch.full((2, 3, n), float("nan"), dtype=dtype, device=device))
    want = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, **KERNEL_TOL[dtype])


def _invariance_cases():
    """Every shape and dtype on the GPU; on the interpreter (which computes every dtype in
    fp32, slowly) two shapes in bf16."""
    cuda, cpu = DEVICES
    for shape in SHAPES:
        for dtype in DTYPES:
            yield pytest.param("cuda", *shape.values, dtype.values[0], marks=cuda.marks, id=f"cuda-{dtype.id}-{shape.id}")
            if shape.id != "down" and dtype.id == "bf16":
                yield pytest.param("cpu", *shape.values, dtype.values[0], marks=cpu.marks, id=f"interp-{shape.id}")


@pytest.mark.parametrize("device,n,k,dtype", list(_invariance_cases()))
def test_linear_is_batch_invariant(tk, device, n, k, dtype):
    """A 1-row decode step, a verify step and a prefill give one row the same bits."""
    gen = torch.Generator().manual_seed(7)
    rows = _rows(device)
    x = randn(max(rows) + 5, k, dtype=dtype, device=device, gen=gen)
    w = randn(n, k, dtype=dtype, device=device, gen=gen) * k ** -0.5
    _check_rows_invariant(tk.linear, x, w, randn(n, dtype=dtype, device=device, gen=gen), rows)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_rows_keep_their_bits_wherever_they_sit(dtype):
    """Request b's row sits at b in a decode step and at b * (K + 1) + j in a verify step:
    its bits may not depend on its place in the tile. GPU only: the interpreter's matmul is
    NumPy's, which does not promise that."""
    from ops.backends import triton_kernels as tk

    gen = torch.Generator().manual_seed(9)
    x = randn(40, 576, dtype=dtype, device="cuda", gen=gen)
    w = randn(960, 576, dtype=dtype, device="cuda", gen=gen) * 576 ** -0.5
    full = tk.linear(x, w)
    for i in (1, 5, 13, 22, 39):
        assert torch.equal(tk.linear(x[i:i + 1], w), full[i:i + 1]), i
        assert torch.equal(tk.linear(x[i - 1:i + 7], w)[1], full[i]), i


def test_invariance_check_fails_when_the_reduction_order_follows_m(tk, device):
    """Negative control: a launch that splits K in two for more than 4 rows (what a split-K
    heuristic does) must fail the same check. (A different K step alone is no such control:
    the kernel still sums K in order, chunk after chunk.)"""
    gen = torch.Generator().manual_seed(8)
    x = randn(24, 512, device=device, gen=gen)
    w = randn(64, 512, device=device, gen=gen)

    def split_k_when_many_rows(x, w, bias, config=None):
        if x.shape[0] <= 4:
            return tk.linear(x, w, bias)
        return tk.linear(x[:, :256].contiguous(), w[:, :256].contiguous()) + tk.linear(x[:, 256:].contiguous(),
                                                                                     w[:, 256:].contiguous())

    with pytest.raises(AssertionError, match="differ"):
        _check_rows_invariant(split_k_when_many_rows, x, w, None, (1,))


def test_linear_warns_when_it_falls_back_to_the_reference(tk, device, caplog):
    """Autograd (training) runs F.linear quietly; a layout the kernel cannot read says so."""
    w = torch.randn(8, 16, device=device, requires_grad=True)
    x = torch.randn(3, 16, device=device)
    assert tk.linear(x, w).requires_grad
    assert not caplog.records
    transposed = torch.randn(16, 8, device=device).t()          # [8, 16] with K strided
    with caplog.at_level("WARNING", logger="ops"):
        got = tk.linear(x, transposed)
    torch.testing.assert_close(got, x @ transposed.t())
    assert "not batch-invariant" in caplog.text
