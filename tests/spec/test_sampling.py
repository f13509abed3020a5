"""SamplingBatch.probs against a plain per-row reference, and the counter-based noise."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from ascend_dspark.spec.sampling import (SamplingBatch, SamplingParams, Stream, exponential_race,
                                         uniform, uniform_vocab)

CPU = torch.device("cpu")
ALPHA = 1e-3


# ---------------------------------------------------------------- reference probs

def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row, written the obvious way: temperature, top-k, top-p, min-p, in that order.

    top-p keeps the smallest prefix of the sorted tokens whose mass reaches top_p. min-p
    drops tokens below min_p * (largest probability). Greedy gives a one-hot on the argmax.
    """
    vocab = logits.numel()
    values = logits.double().tolist()
    if params.greedy:
        out = [0.0] * vocab
        out[max(range(vocab), key=lambda i: (values[i], -i))] = 1.0
        return torch.tensor(out)
    scaled = [v / params.temperature for v in values]
    order = sorted(range(vocab), key=lambda i: -scaled[i])
    keep = order[:params.top_k] if 0 < params.top_k < vocab else order

    def normalise(tokens):
        top = max(scaled[i] for i in tokens)
        weights = {i: pow(2.718281828459045, scaled[i] - top) for i in tokens}
        total = sum(weights.values())
        return {i: w / total for i, w in weights.items()}

    if params.top_p < 1.0:
        probs, mass, prefix = normalise(keep), 0.0, []
        for i in keep:
            prefix.append(i)
            mass += probs[i]
            if mass >= params.top_p:
                break
        keep = prefix
    probs = normalise(keep)
    if params.min_p > 0.0:
        floor = params.min_p * max(probs.values())
        kept = {i: v for i, v in probs.items() if v >= floor}
        probs = {i: v / sum(kept.values()) for i, v in kept.items()}
    out = [0.0] * vocab
    for i, v in probs.items():
        out[i] = v
    return torch.tensor(out)


GRID = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
        for t, k, p, m in itertools.product([0.0, 0.3, 0.7, 1.0, 1.5], [0, 1, 3, 20],
                                            [1.0, 0.5, 0.9], [0.0, 0.05, 0.3])]


def _random_logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _check(params: list[SamplingParams], logits: torch.Tensor) -> None:
    probs = SamplingBatch(params, CPU).probs(logits)
    assert probs.shape == logits.shape and probs.dtype == torch.float32
    flat_logits = logits.reshape(len(params), -1, logits.shape[-1])
    flat_probs = probs.reshape_as(flat_logits)
    for b, prm in enumerate(params):
        for s in range(flat_logits.shape[1]):
            ref = reference_probs(flat_logits[b, s], prm)
            assert torch.allclose(flat_probs[b, s], ref, atol=1e-6, rtol=0), (prm, s, flat_probs[b, s], ref)


def test_probs_match_reference_mixed_batch():
    _check(GRID, _random_logits(len(GRID), 16))


def test_probs_match_reference_3d_logits():
    """Verification passes [B, K+1, V]: each row's parameters apply to all its positions."""
    params = GRID[::7]
    _check(params, _random_logits(len(params), 4, 16, seed=1))


@pytest.mark.parametrize("feature", ["temperature", "top_k", "top_p", "min_p", "greedy"])
def test_probs_match_reference_single_feature(feature):
    """Batches where only one transform is switched on (exercises the host-side flags)."""
    params = {
        "temperature": [SamplingParams(temperature=t) for t in (0.2, 1.0, 1.7)],
        "top_k": [SamplingParams(top_k=k) for k in (1, 2, 5, 0)],
        "top_p": [SamplingParams(top_p=p) for p in (0.1, 0.6, 0.95, 1.0)],
        "min_p": [SamplingParams(min_p=m) for m in (0.01, 0.2, 0.0)],
        "greedy": [SamplingParams(temperature=0.0) for _ in range(3)],
    }[feature]
    _check(params, _random_logits(len(params), 3, 12, seed=2))


def test_greedy_rows_are_one_hot():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=3)]
    logits = _random_logits(2, 5, 10, seed=3)
    probs = SamplingBatch(params, CPU).probs(logits)
    one_hot = torch.nn.functional.one_hot(logits[0].argmax(-1), 10).float()
    assert torch.equal(probs[0], one_hot)
    assert ((probs[1] > 0).sum(-1) == 3).all()


def test_sample_greedy_is_argmax():
    params = [SamplingParams(temperature=0.0, seed=i) for i in range(8)]
    sampling = SamplingBatch(params, CPU)
    logits = _random_logits(8, 30, seed=4)
    tokens = sampling.sample(sampling.probs(logits), torch.arange(8), Stream.TARGET)
    assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(min_p=1.0), dict(max_tokens=0), dict(seed=-1)])
def test_sampling_params_validation(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# ---------------------------------------------------------------- counter-based noise

N = 20_000


def _seeds(n: int, base: int = 0) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long) + base


def test_uniform_is_uniform_across_seeds_and_positions():
    across_seeds = uniform(_seeds(N), torch.full((N,), 5), Stream.ACCEPT)
    across_positions = uniform(torch.full((N,), 12345), torch.arange(N), Stream.ACCEPT)
    big_seeds = uniform(_seeds(N, base=2**40), torch.zeros(N, dtype=torch.long), Stream.TARGET)
    for u in (across_seeds, across_positions, big_seeds):
        assert ((u > 0) & (u < 1)).all()
        assert stats.kstest(u.numpy(), "uniform").pvalue > ALPHA
    vocab = uniform_vocab(_seeds(2000), torch.zeros(2000, dtype=torch.long), Stream.TARGET, 50)
    assert vocab.shape == (2000, 50)
    assert stats.kstest(vocab.flatten().numpy(), "uniform").pvalue > ALPHA


def test_uniform_detects_non_uniform():
    """Power check for the KS test above: a mildly skewed uniform must be caught."""
    u = uniform(_seeds(N), torch.full((N,), 5), Stream.ACCEPT)
    assert stats.kstest((u ** 1.1).numpy(), "uniform").pvalue < ALPHA


def _independent(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a == b).double().mean() < 1e-3 and abs(stats.pearsonr(a.numpy(), b.numpy())[0]) < 0.05


def test_uniform_differs_across_seeds_positions_streams():
    seeds, pos = _seeds(N, base=77), torch.arange(N) % 50
    base = uniform(seeds, pos, Stream.ACCEPT)
    assert _independent(base, uniform(seeds + 1, pos, Stream.ACCEPT))
    assert _independent(base, uniform(seeds + 2**32, pos, Stream.ACCEPT))       # high bits count
    assert _independent(base, uniform(seeds, pos + 1, Stream.ACCEPT))
    assert _independent(base, uniform(seeds, pos, Stream.TARGET))
    assert _independent(base, uniform(seeds, pos, Stream.DRAFT))
    vocab = uniform_vocab(seeds[:500], pos[:500], Stream.ACCEPT, 40)
    assert _independent(vocab[:, 0], vocab[:, 1])
    assert torch.equal(base, uniform(seeds.clone(), pos.clone(), Stream.ACCEPT))   # deterministic


def test_noise_does_not_depend_on_batch():
    seeds = torch.tensor([3, 2**62 + 5, 99])
    pos = torch.tensor([[0, 1], [7, 8], [100, 101]])
    full = uniform_vocab(seeds, pos, Stream.DRAFT, 16)
    for b in range(3):
        assert torch.equal(uniform_vocab(seeds[b:b + 1], pos[b:b + 1], Stream.DRAFT, 16)[0], full[b])


WEIGHTS = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 6.0])          # unnormalised, one zero


def _race_pvalue(tokens: torch.Tensor, weights: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=weights.numel()).double()
    support = weights > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = weights[support].double() / weights.sum() * counts.sum()
    return float(stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue)


def test_exponential_race_matches_weights():
    tokens = exponential_race(WEIGHTS.expand(N, -1), _seeds(N), torch.zeros(N, dtype=torch.long), Stream.TARGET)
    assert _race_pvalue(tokens, WEIGHTS) > ALPHA
    # Same seed, many positions (how one request decodes a long text).
    tokens = exponential_race(WEIGHTS.expand(N, -1), torch.full((N,), 42), torch.arange(N), Stream.DRAFT)
    assert _race_pvalue(tokens, WEIGHTS) > ALPHA
    # Power check: a slightly different law must be rejected.
    assert _race_pvalue(tokens, WEIGHTS + torch.tensor([0.5, 0, 0, 0, 0, 0])) < ALPHA


def test_exponential_race_per_row_weights():
    other = torch.tensor([5.0, 0.0, 1.0, 1.0, 2.0, 1.0])
    weights = torch.stack([WEIGHTS, other]).repeat(N // 2, 1)           # rows alternate
    tokens = exponential_race(weights, _seeds(N), torch.zeros(N, dtype=torch.long), Stream.TARGET)
    assert _race_pvalue(tokens[0::2], WEIGHTS) > ALPHA
    assert _race_pvalue(tokens[1::2], other) > ALPHA


def test_uniform_never_reaches_zero_or_one():
    """The extreme hashes map strictly inside (0, 1) (1.0 once made a zero-weight token win)."""
    from ops.sampling import _to_unit

    extremes = _to_unit(torch.tensor([0, 0xFFFFFFFF], dtype=torch.long))
    assert 0.0 < extremes[0] < extremes[1] < 1.0
