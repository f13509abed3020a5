"""The Triton kernels (ops/backends/triton_kernels) against the reference ops.

Every kernel runs on fresh random inputs of the model-shaped cases in op_cases.py and is
compared with the op's `.reference`; outputs are preallocated full of NaN so an element the
kernel fails to write shows up. Each test runs twice:

- `cuda`: on the GPU (marked `cuda`: skipped without one, required by `make test-cuda`);
- `interp`: on CPU tensors under Triton's interpreter. `TRITON_INTERPRET=1` must be set
  before the kernels are decorated, so these run in a child pytest process started by
  `test_cpu_kernels_in_child_process` (when triton is importable and no GPU is present) and
  never touch the parent's triton state. Run them directly with
  `TRITON_INTERPRET=1 python -m pytest tests/ops/test_ops_triton.py -k interp`.

Under the interpreter fp32 -> bf16 casts truncate instead of rounding to nearest even, so
results that are bit-exact on the GPU (the residual sum, a KV cast) get one bf16 ulp there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_cases import CASE_PARAMS, CASES, KERNEL_TOL, inv_freq, norm_weight, randn

import ops
from ops.markov import markov_head_step

markov_reference = markov_head_step.reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[2]

DEVICES = [
    pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
    pytest.param("cpu", id="interp", marks=pytest.mark.skipif(
        not (INTERPRET and HAVE_TRITON), reason="run in the child of test_cpu_kernels_in_child_process")),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
NAN = float("nan")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def tk(device):
    """The kernels module (imported only once we know which mode this process runs in)."""
    from ops.backends import triton_kernels

    return triton_kernels


def _row_shapes(device: str) -> list[tuple[int, ...]]:
    """Leading dims: decode-like everywhere; on the GPU also a prefill-like odd row count."""
    return [(2, 3)] if device == "cpu" else [(2, 3), (3, 129)]


def _poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, NAN, dtype=dtype, device=device)


def _check(actual: torch.Tensor, expected: torch.Tensor, exact_on_gpu: bool = False,
           rounded_to: torch.dtype | None = None) -> None:
    """`rounded_to`: an intermediate rounding dtype coarser than the output's (sets the tolerance)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "kernel left unwritten (NaN) elements"
    tol = KERNEL_TOL[rounded_to or expected.dtype]
    if exact_on_gpu and actual.device.type == "cuda":
        tol = dict(rtol=0.0, atol=0.0)
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# -- norms ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("where", ["hidden", "head"])
def test_rms_norm(tk, device, case, dtype, where):
    gen = torch.Generator().manual_seed(10)
    dim = case.hidden if where == "hidden" else case.head_dim
    w = norm_weight(case, dim, dtype, device, gen)
    for lead in _row_shapes(device):
        shape = (*lead, dim) if where == "hidden" else (*lead, case.heads, dim)
        x = 2.0 * randn(*shape, dtype=dtype, device=device, gen=gen)
        out = tk.rms_norm(x, w, case.eps, case.offset, out=_poisoned(shape, dtype, device))
        _check(out, ops.rms_norm.reference(x, w, case.eps, case.offset))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_add_rms_norm(tk, device, case, dtype):
    gen = torch.Generator().manual_seed(11)
    w = norm_weight(case, case.hidden, dtype, device, gen)
    for lead in _row_shapes(device):
        shape = (*lead, case.hidden)
        x, res = randn(*shape, dtype=dtype, device=device, gen=gen), randn(*shape, dtype=dtype, device=device, gen=gen)
        normed, summed = tk.add_rms_norm(x, res, w, case.eps, case.offset, out=_poisoned(shape, dtype, device),
                                         summed_out=_poisoned(shape, dtype, device))
        ref_normed, ref_summed = ops.add_rms_norm.reference(x, res, w, case.eps, case.offset)
        _check(summed, ref_summed, exact_on_gpu=True)
        _check(normed, ref_normed)


def test_norm_dtype_promotion_follows_the_reference(tk, device):
    """bf16 activations with an fp32 weight: x * w promotes (offset 0), Gemma's form keeps x's dtype."""
    gen = torch.Generator().manual_seed(12)
    x = randn(5, 96, dtype=torch.bfloat16, device=device, gen=gen)
    res = randn(5, 96, dtype=torch.float32, device=device, gen=gen)
    w = randn(96, device=device, gen=gen)
    for offset in (0.0, 1.0):
        got, want = tk.rms_norm(x, w, 1e-6, offset), ops.rms_norm.reference(x, w, 1e-6, offset)
        assert got.dtype == (torch.bfloat16 if offset else torch.float32)
        _check(got, want, rounded_to=torch.bfloat16)
        pairs = zip(tk.add_rms_norm(x, res, w, 1e-6, offset), ops.add_rms_norm.reference(x, res, w, 1e-6, offset))
        for got, want in pairs:
            assert got.dtype == torch.float32
            _check(got, want)


@pytest.mark.parametrize("hidden", [576, 4096, 77])
def test_rms_norm_is_batch_invariant(tk, device, hidden):
    """A row's bits do not depend on how many rows share the launch (1-token decode vs a
    16-token verification), so greedy speculative decoding stays token-identical."""
    gen = torch.Generator().manual_seed(20)
    x = randn(37, hidden, dtype=torch.bfloat16, device=device, gen=gen)
    res = randn(37, hidden, dtype=torch.bfloat16, device=device, gen=gen)
    w = randn(hidden, dtype=torch.bfloat16, device=device, gen=gen)
    full = tk.rms_norm(x, w, 1e-5)
    full_add = tk.add_rms_norm(x, res, w, 1e-5)
    for n in (1, 3, 16):
        assert torch.equal(tk.rms_norm(x[:n], w, 1e-5), full[:n])
        assert torch.equal(tk.add_rms_norm(x[:n], res[:n], w, 1e-5)[0], full_add[0][:n])


def test_rms_norm_strided_rows(tk, device):
    """Rows that are a slice of a wider tensor (row stride != hidden) are read in place."""
    gen = torch.Generator().manual_seed(13)
    wide = randn(7, 200, dtype=torch.bfloat16, device=device, gen=gen)
    x = wide[:, 10:150]
    w = randn(140, dtype=torch.bfloat16, device=device, gen=gen)
    _check(tk.rms_norm(x, w, 1e-6), ops.rms_norm.reference(x, w, 1e-6))


# -- activations ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activation(tk, device, case, dtype, act):
    gen = torch.Generator().manual_seed(14)
    kernel, reference = {"silu": (tk.silu_and_mul, ops.silu_and_mul.reference),
                         "gelu_tanh": (tk.gelu_tanh_and_mul, ops.gelu_tanh_and_mul.reference)}[act]
    for lead in _row_shapes(device):
        shape = (*lead, case.intermediate)
        g = 3.0 * randn(*shape, dtype=dtype, device=device, gen=gen)
        u = randn(*shape, dtype=dtype, device=device, gen=gen)
        _check(kernel(g, u, out=_poisoned(shape, dtype, device)), reference(g, u))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activation_on_halves_of_a_merged_projection(tk, device, act):
    gen = torch.Generator().manual_seed(15)
    merged = 3.0 * randn(2, 5, 2 * 1000, dtype=torch.bfloat16, device=device, gen=gen)
    gate, up = merged.chunk(2, dim=-1)                              # row stride 2000, not contiguous
    kernel, reference = {"silu": (tk.silu_and_mul, ops.silu_and_mul.reference),
                         "gelu_tanh": (tk.gelu_tanh_and_mul, ops.gelu_tanh_and_mul.reference)}[act]
    _check(kernel(gate, up), reference(gate, up))


def test_gated_activation_mixed_dtypes(tk, device):
    gen = torch.Generator().manual_seed(16)
    g = randn(4, 300, dtype=torch.bfloat16, device=device, gen=gen)
    u = randn(4, 300, dtype=torch.float32, device=device, gen=gen)
    # fp32 out, the activation rounded to bf16 first
    _check(tk.silu_and_mul(g, u), ops.silu_and_mul.reference(g, u), rounded_to=torch.bfloat16)


# -- rotary --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("which", ["q", "k"])
def test_apply_rotary(tk, device, case, dtype, which):
    gen = torch.Generator().manual_seed(17)
    heads = case.heads if which == "q" else case.kv_heads
    freqs = inv_freq(case.rotary_dim)
    for lead in _row_shapes(device):
        shape = (*lead, heads, case.head_dim)
        x = randn(*shape, dtype=dtype, device=device, gen=gen)
        positions = torch.randint(0, 4096, lead, generator=gen).to(device)
        cos, sin = ops.rotary_cos_sin(freqs.to(device), positions, dtype=dtype)
        _check(tk.apply_rotary(x, cos, sin, out=_poisoned(shape, dtype, device)),
               ops.apply_rotary.reference(x, cos, sin))


def test_apply_rotary_strided_input_and_broadcast_cos(tk, device):
    """x a head-slice of a wider tensor (fused qkv layout), cos/sin shared across the batch."""
    gen = torch.Generator().manual_seed(18)
    qkv = randn(3, 4, 9 + 2 * 3, 64, dtype=torch.bfloat16, device=device, gen=gen)
    q = qkv[:, :, :9]
    cos, sin = ops.rotary_cos_sin(inv_freq(32).to(device), torch.arange(4, device=device)[None], dtype=torch.bfloat16)
    _check(tk.apply_rotary(q, cos, sin), ops.apply_rotary.reference(q, cos, sin))
    cos32, sin32 = cos.float(), sin.float()                         # bf16 x, fp32 cos: fp32 result
    _check(tk.apply_rotary(q, cos32, sin32), ops.apply_rotary.reference(q, cos32, sin32))


# -- KV write -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("k_dtype", ["same", "fp32"])
def test_kv_write(tk, device, case, dtype, k_dtype):
    gen = torch.Generator().manual_seed(19)
    blocks, block_size, bsz, t = 6, 4, 3, 4
    shape = (blocks, block_size, case.kv_heads, case.head_dim)
    src_dtype = dtype if k_dtype == "same" else torch.float32
    k = randn(bsz, t, case.kv_heads, case.head_dim, dtype=src_dtype, device=device, gen=gen)
    v = randn(bsz, t, case.kv_heads, case.head_dim, dtype=src_dtype, device=device, gen=gen)
    rows = torch.tensor([[0, 1, 2, 23], [9, 10, 11, 4], [18, 7, 17, 13]], device=device)   # distinct flat rows
    caches = [_poisoned(shape, dtype, device) for _ in range(4)]
    tk.kv_write(caches[0], caches[1], k, v, rows)
    ops.kv_write.reference(caches[2], caches[3], k, v, rows)
    exact = k_dtype == "same" or device == "cuda"                  # the interpreter truncates fp32 -> bf16
    tol = dict(rtol=0.0, atol=0.0) if exact else KERNEL_TOL[dtype]
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        # Written rows identical, and NaN exactly where the reference left NaN (untouched).
        torch.testing.assert_close(got, want, equal_nan=True, **tol)


# -- paged attention ---------------------------------------------------------------------------

def _attention_inputs(case, dtype, device, bsz, t, num_keys, kind, gen, blocks=12, page=4):
    """Queries at the end of each row's context over scattered blocks, with a causal,
    DFlash/DSpark block or sliding-window mask of width `num_keys`."""
    q = randn(bsz, t, case.heads, case.head_dim, dtype=dtype, device=device, gen=gen)
    k_cache = randn(blocks, page, case.kv_heads, case.head_dim, dtype=dtype, device=device, gen=gen)
    v_cache = randn(blocks, page, case.kv_heads, case.head_dim, dtype=dtype, device=device, gen=gen)
    width = -(-num_keys // page)
    table = torch.randperm(blocks, generator=gen)[: bsz * width].view(bsz, width).to(torch.int32).to(device)
    ends = torch.tensor([num_keys - 3 * b for b in range(bsz)])                 # ragged contexts
    positions = ends.view(-1, 1) - t + torch.arange(t)
    limit = ends.view(-1, 1).expand(-1, t) if kind == "block" else positions + 1
    mask = ops.build_attention_mask(positions, limit, num_keys, 5 if kind == "window" else None).to(device)
    return q, k_cache, v_cache, table, mask, ends


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("kind", ["causal", "block", "window"])
def test_attention(tk, device, case, dtype, kind):
    gen = torch.Generator().manual_seed(23)
    q, k_cache, v_cache, table, mask, _ = _attention_inputs(case, dtype, device, 3, 4, 15, kind, gen)
    scale = case.head_dim ** -0.5
    _check(tk.attention(q, k_cache, v_cache, table, mask, scale),
           ops.attention.reference(q, k_cache, v_cache, table, mask, scale))


@pytest.mark.parametrize("t", [1, 40])
def test_attention_reads_no_key_past_a_rows_reach(tk, device, t):
    """Keys past the last one a row's queries may see are never read (NaN there stays out of
    the result), and query tiles of a long chunk (40 tokens x 4 heads per KV head: ten
    tiles) each stop at their own last visible key."""
    case = CASES[1]
    gen = torch.Generator().manual_seed(29)
    q, k_cache, v_cache, table, mask, ends = _attention_inputs(case, torch.bfloat16, device, 2, t, 48, "causal", gen,
                                                               blocks=40)
    clean_k, clean_v = k_cache.clone(), v_cache.clone()
    page = k_cache.shape[1]
    for b, end in enumerate(ends.tolist()):
        for s in range(end, table.shape[1] * page):                # never visible to this row
            blk, off = int(table[b, s // page]), s % page
            k_cache[blk, off], v_cache[blk, off] = NAN, NAN
    scale = case.head_dim ** -0.5
    _check(tk.attention(q, k_cache, v_cache, table, mask, scale),
           ops.attention.reference(q, clean_k, clean_v, table, mask, scale))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_is_batch_invariant(dtype):
    """A query gets the same bits alone (a decode step) as inside an 8-token verify chunk,
    whose tile reaches keys this query may not see. GPU only: the interpreter's matmul is
    NumPy's, whose result for a row depends on where the row sits in the tile."""
    from ops.backends import triton_kernels as tk

    device = "cuda"
    case = CASES[0]                                              # SmolLM2: 3 query heads per KV head
    gen = torch.Generator().manual_seed(31)
    q, k_cache, v_cache, table, mask, _ = _attention_inputs(case, dtype, device, 2, 8, 30, "causal", gen, blocks=20)
    scale = case.head_dim ** -0.5
    chunk = tk.attention(q, k_cache, v_cache, table, mask, scale)
    for j in (0, 3, 7):
        alone = tk.attention(q[:, j:j + 1].contiguous(), k_cache, v_cache, table, mask[:, :, j:j + 1], scale)
        assert torch.equal(alone, chunk[:, j:j + 1]), j


# -- DSpark's Markov step -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("conf", ["markov", "hidden", "none"])
def test_markov_head_step(tk, device, dtype, conf):
    """The fused vanilla step (bias, base logits added, confidence logit) against the reference."""
    gen = torch.Generator().manual_seed(37)
    b, v, r, h = 3, 1000, 32, 72                                    # V not a multiple of the tile
    w1, w2 = randn(v, r, dtype=dtype, device=device, gen=gen), randn(v, r, dtype=dtype, device=device, gen=gen)
    hidden = randn(b, 2, h, dtype=dtype, device=device, gen=gen)[:, 1]       # a strided slot of [B, K, H]
    base = randn(b, 2, v, device=device, gen=gen)[:, 0]
    prev = torch.tensor([5, 999, 0], device=device)
    kw = dict(markov_w1=w1, markov_w2=w2)
    if conf != "none":
        width = h + (r if conf == "markov" else 0)
        kw.update(conf_weight=randn(1, width, dtype=dtype, device=device, gen=gen),
                  conf_bias=randn(1, dtype=dtype, device=device, gen=gen), conf_with_markov=conf == "markov")
    got, want = tk.markov_head_step(prev, hidden, base, **kw), markov_reference(prev, hidden, base, **kw)
    _check(got[0], want[0], rounded_to=dtype)
    assert (got[1] is None) == (conf == "none") and got[2] is None and want[2] is None
    if conf != "none":
        _check(got[1], want[1])


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_markov_greedy_step(tk, device, dtype):
    """The greedy step (argmax inside the Markov kernel, one-hot written by a second launch)
    gives the token and one-hot of torch.argmax over the reference's logits, ties to the
    lowest index across tiles, into a strided slot of [B, K, V]; every element written."""
    gen = torch.Generator().manual_seed(43)
    b, v, r, h = 4, 1300, 32, 40                                    # three tiles, the last partial
    w1, w2 = randn(v, r, dtype=dtype, device=device, gen=gen), randn(v, r, dtype=dtype, device=device, gen=gen)
    w2[[7, 600, 1299]] = 0                                           # no bias: the base logits tie there
    hidden = randn(b, h, dtype=dtype, device=device, gen=gen)
    base = randn(b, v, device=device, gen=gen)
    base[1, [600, 7]] = 50.0                                         # tie across tiles: 7 wins
    base[2, [1299, 600]] = 50.0                                      # tie across tiles: 600 wins
    prev = torch.tensor([5, 1299, 0, 17], device=device)
    kw = dict(markov_w1=w1, markov_w2=w2, conf_weight=randn(1, h + r, dtype=dtype, device=device, gen=gen),
              conf_bias=randn(1, dtype=dtype, device=device, gen=gen))
    probs = torch.full((b, 3, v), NAN, device=device)
    tokens, conf, state = tk.markov_greedy_step(prev, hidden, base, None, probs[:, 1], **kw)
    logits, want_conf, _ = markov_reference(prev, hidden, base, **kw)
    want = logits.argmax(-1)
    assert tokens.tolist() == want.tolist() and tokens.dtype == torch.long and state is None
    assert tokens[1].item() == 7 and tokens[2].item() == 600
    assert torch.equal(probs[:, 1], torch.nn.functional.one_hot(want, v).float())
    assert torch.isnan(probs[:, 0]).all() and torch.isnan(probs[:, 2]).all()     # the other slots untouched
    _check(conf, want_conf)


def test_markov_head_step_runs_the_reference_for_gated_heads(tk, device):
    gen = torch.Generator().manual_seed(41)
    w1, w2 = randn(50, 8, device=device, gen=gen), randn(50, 8, device=device, gen=gen)
    kw = dict(markov_w1=w1, markov_w2=w2, gate_weight=randn(8, 24, device=device, gen=gen),
              gate_bias=randn(8, device=device, gen=gen))
    args = (torch.tensor([1, 2], device=device), randn(2, 16, device=device, gen=gen), randn(2, 50, device=device, gen=gen))
    for got, want in zip(tk.markov_head_step(*args, **kw), markov_reference(*args, **kw)):
        assert (got is None and want is None) or torch.equal(got, want)


# -- integration -----------------------------------------------------------------------------

def test_backend_module_registers_every_kernel(device):
    import ops.backends.triton as backend
    from ops import registry

    assert set(backend.OPS) == {"rms_norm", "add_rms_norm", "apply_rotary", "silu_and_mul", "gelu_tanh_and_mul",
                                "kv_write", "attention", "linear", "markov_head_step", "markov_greedy_step"}
    for op, fn in backend.OPS.items():
        assert registry.IMPLS[op]["triton"] is fn, op



@pytest.mark.cuda
def test_registry_routes_cuda_tensors_to_triton(monkeypatch):
    from ascend_dspark.platform import make_platform
    from ops import registry
    from ops.backends import triton_kernels

    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    for reg in (make_platform("cuda").ops, registry.DEVICE_DEFAULTS):      # the platform's, and no platform's
        for op in ("rms_norm", "add_rms_norm", "apply_rotary", "silu_and_mul", "gelu_tanh_and_mul", "kv_write",
                   "attention", "linear"):
            assert reg.resolve(op, cuda) is getattr(triton_kernels, op), op
        assert reg.resolve("rms_norm", torch.device("cpu")) is ops.rms_norm.reference
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert make_platform("cuda").ops.resolve("rms_norm", cuda) is ops.rms_norm.reference
    monkeypatch.setenv(registry.ENV_VAR, "reference:linear")
    assert make_platform("cuda").ops.resolve("linear", cuda) is ops.linear.reference
    assert make_platform("cuda").ops.resolve("rms_norm", cuda) is triton_kernels.rms_norm


@pytest.mark.cuda
def test_kernels_replay_in_a_cuda_graph():
    """No host syncs or allocator surprises: a captured norm -> rotary -> kv_write replays on new inputs."""
    from ascend_dspark.platform import make_platform
    from ops.backends import triton_kernels as tk

    platform = make_platform("cuda")
    dev = platform.device
    x = torch.randn(2, 1, 9, 64, device=dev, dtype=torch.bfloat16)
    w = torch.rand(64, device=dev, dtype=torch.bfloat16)
    positions = torch.tensor([[3], [5]], device=dev)
    cos, sin = ops.rotary_cos_sin(inv_freq(64).to(dev), positions, dtype=torch.bfloat16)
    k_cache = torch.zeros(4, 9, 9, 64, device=dev, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    rows = torch.tensor([[12], [23]], device=dev)

    def step():
        k = tk.apply_rotary(tk.rms_norm(x, w, 1e-6), cos, sin)
        tk.kv_write(k_cache, v_cache, k, x, rows)
        return k

    graph = platform.graph()
    out = graph.capture(step)
    x.copy_(torch.randn_like(x))
    graph.replay()
    platform.synchronize()
    want = ops.apply_rotary.reference(ops.rms_norm.reference(x, w, 1e-6), cos, sin)
    _check(out, want)
    flat_k, flat_v = k_cache.view(-1, 9, 64), v_cache.view(-1, 9, 64)
    assert torch.equal(flat_k[rows[:, 0]], out[:, 0])
    assert torch.equal(flat_v[rows[:, 0]], x[:, 0])


# -- the interpreter run (CPU) ----------------------------------------------------------------

@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="this is the child")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the cuda variants run the real kernels")
def test_cpu_kernels_in_child_process():
    """Run the `interp` variants of this module in a child with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = Path(__file__).resolve()
    cmd = [sys.executable, "-m", "pytest", str(here), str(here.with_name("test_ops_linear.py")), "-q", "-k", "interp",
           "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], tail


# -- the real compiler, without a GPU ---------------------------------------------------------

def _compile_for_hopper(kernel, args: dict, constexprs: dict, num_warps: int = 4) -> str:
    """Lower `kernel` through Triton's NVIDIA pipeline to an sm_90 cubin (the bundled ptxas;
    no GPU needed), specialised the way the launcher does (16-divisible ints and pointers
    hinted, ints equal to 1 made constants). Returns the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty, value = args[name]
        if ty.startswith("i") and value == 1:
            signature[name], consts[name] = "constexpr", 1
            continue
        signature[name] = ty
        if ty.startswith("*") or (ty.startswith("i") and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    assert compiled.asm["cubin"]
    return compiled.asm["ptx"]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces the kernels")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the cuda variants compile the kernels")
def test_kernels_compile_for_hopper():
    """What the interpreter accepts the compiler may reject: every kernel, in its main
    variants, must lower to an H100/H200 binary, with vectorised (16-byte) global accesses
    on the aligned model shapes."""
    import importlib

    norm, gated, rotary, kv, attn, mm, markov = (
        importlib.import_module(f"ops.backends.triton_kernels.{m}")
        for m in ("rms_norm", "gated", "rotary", "kv_write", "attention", "matmul", "markov"))
    bf16 = "*bf16"
    for residual, offset in ((False, False), (True, False), (True, True)):
        args = dict(x_ptr=(bf16, 0), res_ptr=(bf16, 0), w_ptr=("*fp32", 0), out_ptr=("*fp32", 0), sum_ptr=(bf16, 0),
                    M=("i32", 7), N=("i32", 576), stride_x=("i32", 576), stride_r=("i32", 576),
                    stride_o=("i32", 576), stride_s=("i32", 576), eps=("fp32", 0), offset=("fp32", 0))
        ptx = _compile_for_hopper(norm._rms_norm_kernel, args, dict(HAS_RESIDUAL=residual, HAS_OFFSET=offset,
                                                                   BLOCK_M=4, BLOCK_N=1024), num_warps=8)
        assert "ld.global.v4" in ptx
    for act in (gated.SILU, gated.GELU_TANH):
        args = dict(g_ptr=(bf16, 0), u_ptr=(bf16, 0), o_ptr=(bf16, 0), N=("i32", 1536), stride_g=("i32", 1536),
                    stride_u=("i32", 1536), stride_o=("i32", 1536))
        ptx = _compile_for_hopper(gated._gated_kernel, args, dict(ACT=act, BLOCK_N=1024))
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx
    for d, rot, out in ((128, 128, bf16), (10, 6, "*fp32")):
        args = dict(x_ptr=(bf16, 0), cos_ptr=(out, 0), sin_ptr=(out, 0), o_ptr=(out, 0), H=("i32", 8), D=("i32", d),
                    R=("i32", rot), HALF=("i32", rot // 2), sx_m=("i32", 8 * d), sx_h=("i32", d), sx_d=("i32", 1),
                    sc_m=("i32", rot), sc_r=("i32", 1), ss_m=("i32", rot), ss_r=("i32", 1), so_m=("i32", 8 * d),
                    so_h=("i32", d))
        ptx = _compile_for_hopper(rotary._rotary_kernel, args, dict(ROUND=out == bf16, HAS_TAIL=rot < d, BLOCK_H=16,
                                                                    BLOCK_HALF=rot // 2 if rot == 128 else 4,
                                                                    BLOCK_TAIL=4))
        assert rot != 128 or "ld.global.v4" in ptx
    for src in (bf16, "*fp32"):
        args = {name: ("i32", 7) for name in kv._kv_write_kernel.arg_names}
        args.update(k_ptr=(src, 0), v_ptr=(src, 0), kc_ptr=(bf16, 0), vc_ptr=(bf16, 0), rows_ptr=("*i64", 0),
                    H=("i32", 8), D=("i32", 128), sk_d=("i32", 1), sv_d=("i32", 1), skc_d=("i32", 1), svc_d=("i32", 1))
        _compile_for_hopper(kv._kv_write_kernel, args, dict(BLOCK_H=8, BLOCK_D=128))
    for d, block_m, ieee in ((64, 32, False), (128, 16, False), (256, 64, False), (64, 16, True)):
        dt = "*fp32" if ieee else bf16
        args = {name: ("i32", 7) for name in attn._paged_attention_kernel.arg_names}
        args.update(q_ptr=(dt, 0), kc_ptr=(dt, 0), vc_ptr=(dt, 0), out_ptr=(dt, 0), table_ptr=("*i32", 0),
                    mask_ptr=("*i1", 0), reach_ptr=("*i32", 0), scale=("fp32", 0), D=("i32", d),
                    sq_d=("i32", 1), skc_d=("i32", 1), svc_d=("i32", 1), so_d=("i32", 1), sm_s=("i32", 1))
        _compile_for_hopper(attn._paged_attention_kernel, args,
                            dict(PAGE=16, BLOCK_M=block_m, BLOCK_N=64 if d <= 128 else 32, BLOCK_D=d, FP32_MATH=ieee,
                                 INTERPRETED_KEYS=0))
    for dt, k, bias in ((bf16, 576, False), ("*fp16", 4096, True), ("*fp32", 77, False)):
        args = dict(x_ptr=(dt, 0), w_ptr=(dt, 0), b_ptr=(dt, 0), out_ptr=(dt, 0), M=("i32", 7), N=("i32", 960),
                    sx_m=("i32", k), sw_n=("i32", k), so_m=("i32", 960))
        ptx = _compile_for_hopper(mm._linear_kernel, args, dict(K=k, HAS_BIAS=bias, BLOCK_M=16, BLOCK_N=32,
                                                              BLOCK_K=32 if dt == "*fp32" else 128,
                                                              FP32_MATH=dt == "*fp32"))
        assert dt == "*fp32" or "mma.sync" in ptx or "wgmma" in ptx
    args = {name: ("i32", 7) for name in markov._markov_step_kernel.arg_names}
    args.update(prev_ptr=("*i64", 0), w1_ptr=(bf16, 0), w2_ptr=(bf16, 0), base_ptr=("*fp32", 0),
                logits_ptr=("*fp32", 0), hidden_ptr=(bf16, 0), cw_ptr=(bf16, 0), cb_ptr=(bf16, 0), conf_ptr=("*fp32", 0),
                part_max_ptr=("*fp32", 0), part_idx_ptr=("*i32", 0))
    for greedy in (False, True):
        _compile_for_hopper(markov._markov_step_kernel, args, dict(HAS_CONF=True, CONF_WITH_E=True, HAS_CONF_BIAS=True,
                                                                   ARGMAX=greedy, BLOCK_V=512, BLOCK_R=32,
                                                                   BLOCK_H=1024))
    args = dict(part_max_ptr=("*fp32", 0), part_idx_ptr=("*i32", 0), probs_ptr=("*fp32", 0), tokens_ptr=("*i64", 0),
                V=("i32", 49152), TILES=("i32", 96), s_probs=("i32", 7 * 49152))
    _compile_for_hopper(markov._one_hot_kernel, args, dict(BLOCK_T=128, BLOCK_V=512))
