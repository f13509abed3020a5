"""ops.sampling / ops.verify / ops.markov references against independent per-row Python,
and the torch_npu top-k/top-p backend under the fake_torch_npu test double.

The per-row references below are written the obvious way (Python floats, sorted lists,
explicit loops) and share no code with the ops. Top-p boundaries are compared with a
tolerance: a token whose mass-above lies within TOL of top_p may go either way, since the
ops accumulate in float32 and the reference in float64.
"""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch
from scipy import stats

import ops
from ops import registry
from ops.markov import markov_confidence_step
from ops.sampling import (apply_min_p, apply_temperature_top_k_top_p, counter_uniform, counter_uniform_vocab,
                          exponential_race)
from ops.verify import (acceptance_probability, residual_distribution, verify_chain, verify_chain_greedy)
from tests.fakes import fake_torch_npu

TOL = 1e-4
ALPHA = 1e-3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- naive per-row reference

def naive_filter(row: list[float], temperature: float, top_k: int | None,
                 top_p: float | None) -> tuple[set[int], set[int]]:
    """(tokens that must be kept, tokens that may go either way) for one row.

    top-k keeps the k largest scaled logits; top-p keeps, in descending order, each token
    whose mass above it (among the top-k) is < top_p; top_p = 1 keeps everything; the
    largest token is always kept. Tokens with equal logits may come in either order, so a
    tie straddling a boundary, or a mass-above within TOL of top_p, is "either way".
    """
    vocab = len(row)
    scaled = [x / temperature for x in row]
    order = sorted(range(vocab), key=lambda i: -scaled[i])
    k = top_k if top_k and 0 < top_k < vocab else vocab
    candidates, unsure = order[:k], set()
    if k < vocab and scaled[order[k - 1]] == scaled[order[k]]:        # a tie at the k-th value
        unsure |= {i for i in order if scaled[i] == scaled[order[k - 1]]}
    if top_p is None or top_p >= 1.0:
        return set(candidates) - unsure, unsure
    top = scaled[candidates[0]]
    weights = [math.exp(scaled[i] - top) for i in candidates]
    total = sum(weights)
    sure, above, start = {candidates[0]}, 0.0, 0
    while start < len(candidates):                                      # groups of equal logits
        end = start
        while end < len(candidates) and scaled[candidates[end]] == scaled[candidates[start]]:
            end += 1
        group = candidates[start:end]
        mass = sum(weights[start:end]) / total
        own = weights[start] / total
        if above + mass - own < top_p - TOL:
            sure |= set(group)
        elif above < top_p + TOL:
            unsure |= set(group)
        above += mass
        start = end
    return sure - unsure, unsure


def assert_filter_matches(out: torch.Tensor, logits: torch.Tensor, temperature: list[float],
                          top_k: list[int] | None, top_p: list[float] | None) -> None:
    """out, logits [B, ..., V]; each row's kept set (finite entries) against naive_filter,
    and the kept values equal logits / temperature."""
    assert out.shape == logits.shape and out.dtype == torch.float32
    batch, vocab = logits.shape[0], logits.shape[-1]
    flat_out, flat_in = out.reshape(batch, -1, vocab), logits.reshape(batch, -1, vocab)
    for b in range(batch):
        for s in range(flat_in.shape[1]):
            row = flat_in[b, s].double().tolist()
            sure, unsure = naive_filter(row, temperature[b], top_k[b] if top_k else None,
                                        top_p[b] if top_p else None)
            kept = set(torch.isfinite(flat_out[b, s]).nonzero().flatten().tolist())
            assert sure <= kept, (b, s, "dropped", sorted(sure - kept)[:10])
            assert kept <= sure | unsure, (b, s, "kept extra", sorted(kept - sure - unsure)[:10])
            assert len(unsure) <= max(8, vocab // 1000), (b, s, len(unsure))
            idx = torch.tensor(sorted(kept))
            expected = flat_in[b, s].float()[idx] / torch.tensor(temperature[b], dtype=torch.float32)
            assert torch.allclose(flat_out[b, s][idx], expected, rtol=1e-6, atol=0)


def _filter_case(shape: tuple[int, ...], seed: int):
    """Random logits and per-row params (mixing disabled and enabled rows)."""
    g = _gen(seed)
    batch = shape[0]
    logits = torch.randn(*shape, generator=g) * 2
    temps = [[0.5, 1.0, 1.7, 0.8][b % 4] for b in range(batch)]
    ks = [[0, 1, 7, 50, 0, 1200][b % 6] for b in range(batch)]
    ps = [[1.0, 0.9, 0.5, 1.0, 0.3, 0.97][(b + 1) % 6] for b in range(batch)]
    return logits, temps, ks, ps


SHAPES = [(6, 17), (4, 3, 33), (5, 1001), (3, 2, 257), (2, 49152), (2, 151936)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("which", ["top_k", "top_p", "both", "neither"])
def test_top_k_top_p_matches_naive(shape, which):
    logits, temps, ks, ps = _filter_case(shape, seed=sum(shape))
    ks = ks if which in ("top_k", "both") else None
    ps = ps if which in ("top_p", "both") else None
    out = apply_temperature_top_k_top_p(
        logits, torch.tensor(temps), None if ks is None else torch.tensor(ks),
        None if ps is None else torch.tensor(ps))
    assert_filter_matches(out, logits, temps, ks, ps)


def test_top_p_one_keeps_every_token_despite_rounding():
    """A peaked row: float32 rounds the top probability to 1, so the mass above every other
    token reads as >= 1; a row with top_p = 1 must still keep them (they have mass)."""
    vocab = 151936
    logits = torch.zeros(3, vocab)
    logits[:, 5] = 30.0
    probs = torch.softmax(logits[0], -1)
    assert probs[5] == 1.0 and (probs > 0).all()         # the premise of the test
    out = apply_temperature_top_k_top_p(logits, torch.ones(3), None, torch.tensor([1.0, 0.5, 1.0]))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert torch.isfinite(out[1]).sum() == 1
    out = apply_temperature_top_k_top_p(logits, torch.ones(3), torch.tensor([0, 3, 0]),
                                        torch.tensor([1.0, 1.0, 0.5]))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).sum() == 3 and torch.isfinite(out[2]).sum() == 1


def test_top_k_larger_than_vocab_keeps_all():
    logits = torch.randn(2, 10, generator=_gen(1))
    out = apply_temperature_top_k_top_p(logits, torch.ones(2), torch.tensor([10, 50]), None)
    assert torch.isfinite(out).all()


def naive_min_p(row: list[float], min_p: float) -> list[float]:
    if min_p <= 0:
        return row
    floor = min_p * max(row)
    kept = [v if v >= floor else 0.0 for v in row]
    total = sum(kept)
    return [v / total for v in kept]


@pytest.mark.parametrize("shape", [(5, 13), (4, 2, 1001), (2, 151936)], ids=lambda s: "x".join(map(str, s)))
def test_min_p_matches_naive(shape):
    g = _gen(7)
    probs = torch.softmax(torch.randn(*shape, generator=g) * 3, -1)
    mins = [[0.0, 0.05, 0.3, 0.9, 0.001][b % 5] for b in range(shape[0])]
    out = apply_min_p(probs, torch.tensor(mins))
    assert out.shape == probs.shape and out.dtype == torch.float32
    flat_p, flat_o = probs.reshape(shape[0], -1, shape[-1]), out.reshape(shape[0], -1, shape[-1])
    for b in range(shape[0]):
        for s in range(flat_p.shape[1]):
            ref = torch.tensor(naive_min_p(flat_p[b, s].double().tolist(), mins[b]), dtype=torch.float64)
            assert torch.allclose(flat_o[b, s].double(), ref, atol=1e-6, rtol=0)
            if mins[b] == 0:
                assert torch.equal(flat_o[b, s], flat_p[b, s])          # untouched, not renormalised


# ---------------------------------------------------------------- noise and the race

def _py_mul32(x: int, c: int) -> int:
    return (x * c) & 0xFFFFFFFF


def _py_mix32(x: int) -> int:
    x ^= x >> 16
    x = _py_mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _py_mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _py_key(seed: int, position: int, stream: int) -> int:
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    h = _py_mix32(hi ^ _py_mix32((stream * 0x9E3779B9) & 0xFFFFFFFF))
    h = _py_mix32(lo ^ h)
    return _py_mix32(h ^ (position & 0xFFFFFFFF))


def _py_unit(h: int) -> float:
    return ((h >> 9) + 0.5) / 8388608.0


def test_counter_noise_matches_python_integers():
    """Bit-exact against plain Python ints: a seeded request reproduces on any backend."""
    seeds = [0, 1, 42, 2**32 + 7, 2**63 - 1, 123456789012345]
    positions = [0, 3, 17, 2**31 + 5, 1000, 99]
    s, p = torch.tensor(seeds), torch.tensor(positions)
    for stream in (1, 2, 3):
        got = counter_uniform(s, p, stream)
        want = [_py_unit(_py_mix32(_py_key(a, b, stream))) for a, b in zip(seeds, positions)]
        assert got.dtype == torch.float32 and got.tolist() == want
        vocab = counter_uniform_vocab(s, p, stream, 37)
        assert vocab.shape == (6, 37)
        for r, (a, b) in enumerate(zip(seeds, positions)):
            key = _py_key(a, b, stream)
            want = [_py_unit(_py_mix32(key ^ _py_mul32(t, 0x9E3779B1))) for t in range(37)]
            assert vocab[r].tolist() == want
    grid = counter_uniform_vocab(s, torch.stack([p, p + 1], 1), 3, 5)          # positions [B, 2]
    assert grid.shape == (6, 2, 5) and torch.equal(grid[:, 1], counter_uniform_vocab(s, p + 1, 3, 5))


def test_counter_noise_runs_no_bit_shift():
    """Shifts on int64 (torch_npu 2.6-2.9 before the 26.0 builds) and `__xor__` (2.6.0) are
    acl_op-only, refused inside NPU graph capture: the hash is written with divisions,
    multiplies and remainders by powers of two, and bitwise_xor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops() as ops_seen:
        counter_uniform_vocab(torch.tensor([5, 2**40]), torch.tensor([[3, 4], [9, 10]]), 2, 11)
        counter_uniform(torch.tensor([5]), torch.tensor([[3]]), 1)
    assert ops_seen.seen and not {n for n in ops_seen.seen if "shift" in n}, ops_seen.seen
    # `^` reaches the dispatcher as bitwise_xor on CPU, but torch_npu 2.6.0 registers
    # `__xor__` itself for acl_op only: the source may not use the operator.
    import ast
    import inspect

    import ops.sampling as sampling

    tree = ast.parse(inspect.getsource(sampling))
    hash_code = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                 and f.name in ("_shr", "_mul32", "_mix32", "_key", "_to_unit", "counter_uniform", "counter_uniform_vocab")]
    assert len(hash_code) == 7
    used = {type(n.op).__name__ for f in hash_code for n in ast.walk(f) if isinstance(n, ast.BinOp)}
    assert not used & {"BitXor", "RShift", "LShift"}, used


@pytest.mark.parametrize("vocab", [6, 1001, 49152, 151936])
def test_exponential_race_matches_naive_argmax(vocab):
    g = _gen(vocab)
    rows = 3
    weights = torch.rand(rows, vocab, generator=g) * (torch.rand(rows, vocab, generator=g) > 0.3)
    noise = torch.rand(rows, vocab, generator=g).clamp(1e-7, 1 - 1e-7)
    got = exponential_race(weights, noise)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    for r in range(rows):
        w, u = weights[r].double().tolist(), noise[r].double().tolist()
        best = max(range(vocab), key=lambda i: w[i] / -math.log(u[i]))
        assert got[r].item() == best


def test_exponential_race_draws_from_the_weights():
    w = torch.tensor([1.0, 0.0, 3.0, 2.0, 0.5])
    n = 40_000
    tokens = exponential_race(w.expand(n, -1), torch.rand(n, 5, generator=_gen(3)))
    counts = torch.bincount(tokens, minlength=5).double()
    assert counts[1] == 0
    support = w > 0
    expected = w[support].double() / w.sum().double() * n
    assert stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue > ALPHA


# ---------------------------------------------------------------- verification op

def _one_row_probs(*rows: list[float]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.sum(-1, keepdim=True)


def _race_token(p: torch.Tensor, seed: int, position: int, stream: int = 3) -> int:
    noise = counter_uniform_vocab(torch.tensor([seed]), torch.tensor([position]), stream, p.numel())
    return int(exponential_race(p.unsqueeze(0), noise)[0])


def test_verify_chain_equal_distributions_accept_all_then_bonus():
    p = _one_row_probs([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25])   # K = 2
    drafts = torch.tensor([[2, 0]])
    coins = torch.tensor([[0.999, 0.999]])
    n, tokens = verify_chain(p.unsqueeze(0), drafts, p[:2].unsqueeze(0), torch.tensor([2]), coins,
                             torch.tensor([11]), torch.tensor([100]), 3)
    assert n.tolist() == [2]
    assert tokens.tolist() == [[2, 0, _race_token(p[2], 11, 102)]]


def test_verify_chain_acceptance_threshold_and_residual():
    """p(x) / q(x) = 0.5: a coin below accepts, above rejects and samples norm(max(0, p - q))."""
    p = _one_row_probs([0.3, 0.5, 0.2], [0.2, 0.2, 0.6])                                   # K = 1
    q = _one_row_probs([0.6, 0.2, 0.2])
    drafts = torch.tensor([[0], [0]])
    coins = torch.tensor([[0.49], [0.51]])
    n, tokens = verify_chain(p.expand(2, -1, -1), drafts, q.expand(2, -1, -1), torch.tensor([1, 1]), coins,
                             torch.tensor([5, 5]), torch.tensor([0, 0]), 3)
    assert n.tolist() == [1, 0]
    assert tokens[0].tolist() == [0, _race_token(p[1], 5, 1)]
    residual = torch.tensor([0.0, 0.3, 0.0]) / 0.3                                        # max(0, p - q)
    assert tokens[1].tolist() == [1, -1] and _race_token(residual, 5, 0) == 1


def test_verify_chain_respects_verify_lens_and_padding():
    """Drafts past verify_len are never proposed: the stop there is a bonus drawn from p."""
    p = _one_row_probs([0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5])
    p = p.expand(3, -1, -1)
    q = p[:, :2]
    drafts = torch.tensor([[0, 2], [1, -1], [-1, -1]])
    coins = torch.full((3, 2), 0.5)
    n, tokens = verify_chain(p, drafts, q, torch.tensor([2, 1, 0]), coins,
                             torch.tensor([1, 2, 3]), torch.tensor([10, 20, 30]), 3)
    assert n.tolist() == [2, 1, 0]
    assert tokens[0].tolist() == [0, 2, _race_token(p[0, 2], 1, 12)]
    assert tokens[1].tolist() == [1, 2, -1]                                               # bonus = p_1 one-hot
    assert tokens[2].tolist() == [_race_token(p[2, 0], 3, 30), -1, -1]


def test_verify_chain_zero_target_probability_is_rejected():
    p = _one_row_probs([0.0, 1.0, 0.0], [1.0, 0.0, 0.0]).unsqueeze(0)
    q = _one_row_probs([1.0, 0.0, 0.0]).unsqueeze(0)
    n, tokens = verify_chain(p, torch.tensor([[0]]), q, torch.tensor([1]), torch.tensor([[1e-6]]),
                             torch.tensor([0]), torch.tensor([0]), 3)
    assert n.tolist() == [0] and tokens.tolist() == [[1, -1]]


def test_verify_chain_k_zero_samples_p():
    p = _one_row_probs([0.1, 0.9]).unsqueeze(0)
    n, tokens = verify_chain(p, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 2), torch.tensor([0]),
                             torch.zeros(1, 0), torch.tensor([9]), torch.tensor([4]), 3)
    assert n.tolist() == [0] and tokens.tolist() == [[_race_token(p[0], 9, 4)]]


def test_verify_chain_first_token_is_distributed_as_p():
    """The lossless identity on one position: accepted draft or residual ~ p."""
    n = 20_000
    p = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    q = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1])
    seeds = torch.arange(n) + 77
    drafts = exponential_race(q.expand(n, -1), counter_uniform_vocab(seeds, torch.zeros(n, dtype=torch.long), 1, 5))
    coins = counter_uniform(seeds, torch.zeros(n, 1, dtype=torch.long), 2)
    target = torch.stack([p, p], 0).expand(n, -1, -1)
    _, tokens = verify_chain(target, drafts.unsqueeze(1), q.expand(n, 1, -1), torch.ones(n, dtype=torch.long),
                             coins, seeds, torch.zeros(n, dtype=torch.long), 3)
    expected = (p.double() / p.double().sum() * n).numpy()
    counts = torch.bincount(tokens[:, 0], minlength=5).double()
    assert stats.chisquare(counts.numpy(), expected).pvalue > ALPHA
    # The rule is an argument: a wrong residual (p instead of norm(max(0, p - q))) is visible.
    _, wrong = verify_chain(target, drafts.unsqueeze(1), q.expand(n, 1, -1), torch.ones(n, dtype=torch.long),
                            coins, seeds, torch.zeros(n, dtype=torch.long), 3, residual=lambda p_, q_: p_)
    counts = torch.bincount(wrong[:, 0], minlength=5).double()
    assert stats.chisquare(counts.numpy(), expected).pvalue < ALPHA


def test_verify_chain_greedy_rows_follow_argmax():
    logits = torch.randn(2, 3, 7, generator=_gen(5))
    argmax = logits.argmax(-1)
    one_hot = torch.nn.functional.one_hot(argmax, 7).float()
    drafts = torch.stack([argmax[0, :2], torch.stack([argmax[1, 0], (argmax[1, 1] + 1) % 7])])
    q = torch.nn.functional.one_hot(drafts, 7).float()
    n, tokens = verify_chain(one_hot, drafts, q, torch.tensor([2, 2]), torch.full((2, 2), 0.5),
                             torch.tensor([0, 1]), torch.tensor([0, 0]), 3, torch.tensor([True, True]),
                             residual=lambda p_, q_: torch.ones_like(p_))          # ignored for greedy rows
    assert n.tolist() == [2, 1]
    assert tokens.tolist() == [[argmax[0, 0], argmax[0, 1], argmax[0, 2]], [argmax[1, 0], argmax[1, 1], -1]]
    gn, gtokens = verify_chain_greedy(logits, drafts, torch.tensor([2, 2]))
    assert torch.equal(gn, n) and torch.equal(gtokens, tokens)


def test_verify_chain_greedy_small_cases():
    logits = torch.full((3, 3, 4), -1.0)
    best = torch.tensor([[1, 2, 3], [0, 0, 0], [3, 1, 2]])
    logits.scatter_(-1, best.unsqueeze(-1), 5.0)
    drafts = torch.tensor([[1, 2], [0, 1], [3, 1]])
    n, tokens = verify_chain_greedy(logits, drafts, torch.tensor([2, 2, 1]))
    assert n.tolist() == [2, 1, 1]
    assert tokens.tolist() == [[1, 2, 3], [0, 0, -1], [3, 1, -1]]
    n, tokens = verify_chain_greedy(logits[:, :1], torch.zeros(3, 0, dtype=torch.long), torch.zeros(3))
    assert n.tolist() == [0, 0, 0] and tokens.tolist() == [[1], [0], [3]]


def test_acceptance_and_residual_rules():
    assert acceptance_probability(torch.tensor([0.2, 0.6, 0.0, 0.3]),
                                  torch.tensor([0.4, 0.3, 0.0, 0.0])).tolist() == [0.5, 1.0, 0.0, 1.0]
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    assert torch.allclose(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(residual_distribution(p, p), p)


# ---------------------------------------------------------------- Markov + confidence step

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_markov_confidence_step_matches_formula(dtype):
    g = _gen(11)
    b, v, r, h = 4, 50, 8, 16
    base = torch.randn(b, v, generator=g)
    prev = torch.tensor([0, 49, 7, 7])
    hidden = torch.randn(b, h, generator=g).to(dtype)
    w1, w2 = torch.randn(v, r, generator=g).to(dtype), torch.randn(v, r, generator=g).to(dtype)
    cw, cb = torch.randn(1, h + r, generator=g).to(dtype), torch.randn(1, generator=g).to(dtype)
    logits, conf = markov_confidence_step(base, prev, hidden, w1, w2, cw, cb)
    assert logits.dtype == torch.float32 and conf.dtype == torch.float32 and conf.shape == (b,)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for i in range(b):
        e = w1[prev[i]].double()
        bias = w2.double() @ e
        assert torch.allclose(logits[i].double(), base[i].double() + bias, **tol)
        z = float(cw[0].double() @ torch.cat([hidden[i].double(), e])) + float(cb[0])
        assert math.isclose(conf[i].item(), 1 / (1 + math.exp(-z)), rel_tol=1e-4 if dtype == torch.float32 else 2e-2)
    # confidence on h alone, and no heads at all
    _, conf_h = markov_confidence_step(base, prev, hidden, w1, w2, cw[:, :h], cb, conf_with_markov=False)
    z = hidden.double() @ cw[0, :h].double() + cb.double()
    assert torch.allclose(conf_h.double(), torch.sigmoid(z), rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 1e-2)
    plain, none = markov_confidence_step(base, prev, hidden)
    assert none is None and torch.equal(plain, base)
    only_conf, c = markov_confidence_step(base, prev, hidden, conf_weight=cw[:, :h], conf_bias=cb)
    assert torch.equal(only_conf, base) and torch.allclose(c, conf_h)


# ---------------------------------------------------------------- torch_npu backend (test double)

@pytest.fixture
def npu_sampling():
    """ops.backends.npu_sampling imported against the fake torch_npu; registry restored after."""
    saved = dict(registry.IMPLS["top_k_top_p"])
    with fake_torch_npu.install() as fake:
        sys.modules.pop("ops.backends.npu_sampling", None)
        module = importlib.import_module("ops.backends.npu_sampling")
        calls = []
        real = fake.module.npu_top_k_top_p

        def spy(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)

        fake.module.npu_top_k_top_p = spy
        module.calls = calls
        try:
            yield module
        finally:
            fake.module.npu_top_k_top_p = real
            sys.modules.pop("ops.backends.npu_sampling", None)
            registry.IMPLS["top_k_top_p"] = saved


NPU_CASES = {                     # shape -> top_k per row (None: _filter_case's, 0 and > V included)
    "6x17": ((6, 17), None), "4x3x33": ((4, 3, 33), None), "5x1001": ((5, 1001), None),
    "3x49152": ((3, 49152), [1, 7, 1024]), "2x2x151936": ((2, 2, 151936), [7, 50]),
}


@pytest.mark.parametrize("case", NPU_CASES)
@pytest.mark.parametrize("which", ["top_k", "top_p", "both"])
def test_npu_top_k_top_p_matches_reference(npu_sampling, case, which):
    shape, kernel_ks = NPU_CASES[case]
    logits, temps, ks, ps = _filter_case(shape, seed=3 + sum(shape))
    ks = kernel_ks or ks
    ks = ks if which in ("top_k", "both") else None
    ps = ps if which in ("top_p", "both") else None
    args = (logits, torch.tensor(temps), None if ks is None else torch.tensor(ks),
            None if ps is None else torch.tensor(ps))
    kb = (min(ks), max(ks)) if ks else None
    out = npu_sampling.apply_temperature_top_k_top_p_npu(*args, top_k_bounds=kb)
    assert len(npu_sampling.calls) == 1                                    # the kernel ran
    call = npu_sampling.calls[0]
    assert (call["k"] is None) == (ks is None) and (call["p"] is None) == (ps is None)
    assert_filter_matches(out, logits, temps, ks, ps)
    ref = apply_temperature_top_k_top_p.reference(*args)
    both = torch.isfinite(out) & torch.isfinite(ref)
    assert torch.equal(out[both], ref[both])
    assert (torch.isfinite(out) != torch.isfinite(ref)).sum() <= 8          # top-p boundary rounding only


def test_npu_top_k_outside_kernel_range_falls_back(npu_sampling):
    """Vocab > 1024 with a row whose k is 0 (off) or > 1024: the reference runs, no kernel."""
    logits, temps, _, ps = _filter_case((3, 2000), seed=1)
    for ks in ([0, 5, 9], [5, 1500, 9]):
        args = (logits, torch.tensor(temps), torch.tensor(ks), torch.tensor(ps))
        out = npu_sampling.apply_temperature_top_k_top_p_npu(*args, top_k_bounds=(min(ks), max(ks)))
        assert torch.equal(out, apply_temperature_top_k_top_p.reference(*args))
    out = npu_sampling.apply_temperature_top_k_top_p_npu(logits, torch.tensor(temps), torch.tensor([5, 6, 7]))
    assert npu_sampling.calls == []                                        # no bounds: cannot know
    assert torch.equal(out, apply_temperature_top_k_top_p.reference(logits, torch.tensor(temps),
                                                                    torch.tensor([5, 6, 7])))


def test_npu_small_vocab_maps_disabled_top_k_to_vocab(npu_sampling):
    """V <= 1024: k = 0 and k > V mean 'keep all' = k = V, which the kernel accepts."""
    logits, temps, _, _ = _filter_case((4, 300), seed=2)
    ks = [0, 3, 400, 300]
    out = npu_sampling.apply_temperature_top_k_top_p_npu(logits, torch.tensor(temps), torch.tensor(ks), None)
    assert npu_sampling.calls[0]["k"].tolist() == [300, 3, 300, 300]
    assert npu_sampling.calls[0]["k"].dtype == torch.int32
    assert_filter_matches(out, logits, temps, ks, None)


def test_npu_p_has_the_logits_dtype_and_bf16_input(npu_sampling):
    """bf16 logits: the kernel gets float32 logits (temperature applied) and float32 p."""
    logits, temps, ks, ps = _filter_case((3, 2, 500), seed=4)
    logits = logits.bfloat16()
    out = npu_sampling.apply_temperature_top_k_top_p_npu(logits, torch.tensor(temps), torch.tensor(ks),
                                                         torch.tensor(ps), top_k_bounds=(min(ks), max(ks)))
    call = npu_sampling.calls[0]
    assert call["p"].dtype == torch.float32 and call["p"].shape == (6,) and call["k"].shape == (6,)
    assert_filter_matches(out, logits, temps, ks, ps)


def test_sampling_batch_gives_npu_valid_top_k_bounds(npu_sampling, monkeypatch):
    """Greedy rows carry top_k = 1, so a mixed batch whose sampled rows use top-k stays on
    the kernel; the distribution SamplingBatch builds is the same as on the reference."""
    from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams

    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=20, top_p=0.9),
              SamplingParams(temperature=1.2, top_k=5)]
    batch = SamplingBatch(params, torch.device("cpu"))
    assert batch.top_k_bounds == (1, 20) and batch.top_k.tolist() == [1, 20, 5]
    logits = torch.randn(3, 4, 5000, generator=_gen(9))
    reference = batch.probs(logits)
    monkeypatch.setitem(registry.IMPLS["top_k_top_p"], "npu", npu_sampling.apply_temperature_top_k_top_p_npu)
    npu_ops = registry.OpRegistry("cpu", "npu")             # CPU tensors stand in for the NPU's
    npu_ops._unavailable["npu"] = None                      # as if ops.backends.npu had loaded
    on_npu = SamplingBatch(params, torch.device("cpu"), npu_ops).probs(logits)
    assert len(npu_sampling.calls) == 1
    assert torch.allclose(on_npu, reference, atol=1e-6, rtol=0)


def test_ops_package_exports_the_new_ops():
    for name in ("apply_temperature_top_k_top_p", "apply_min_p", "counter_uniform", "counter_uniform_vocab",
                 "exponential_race", "verify_chain", "verify_chain_greedy", "markov_confidence_step"):
        assert callable(getattr(ops, name)) and hasattr(getattr(ops, name), "reference")
