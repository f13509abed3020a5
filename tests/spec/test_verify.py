"""Lossless chain verification: exact maths, sampled distributions, greedy path, seeding.

The sampled tests draw drafts with the counter-based DRAFT stream and compare output
token frequencies against the target distribution p with a chi-square test. Every check
that could pass by accident also gets a deliberately wrong variant that must fail.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from ascend_dspark.spec import verify as verify_mod
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams, Stream, exponential_race
from ascend_dspark.spec.verify import acceptance_probability, residual_distribution, verify
from tests.helpers import select_rows

CPU = torch.device("cpu")
ALPHA = 1e-3   # significance level: a correct rule fails ~0.1% of seeds, a wrong one must fail


# ---------------------------------------------------------------- helpers

def _batch(n: int, seed0: int = 1000, **kw) -> tuple[SamplingBatch, list[SamplingParams]]:
    params = [SamplingParams(seed=seed0 + i, **kw) for i in range(n)]
    return SamplingBatch(params, CPU), params


def _dist(*values: float) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    return t / t.sum()


def _draft(q: torch.Tensor, sampling: SamplingBatch, first_position: torch.Tensor) -> torch.Tensor:
    """Draw draft tokens from q [B, K, V] the way a drafter would (DRAFT stream)."""
    k = q.shape[1]
    positions = first_position.unsqueeze(1) + torch.arange(k)
    return exponential_race(q, sampling.seeds, positions, Stream.DRAFT)


def _chisq_pvalue(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Chi-square p-value of token counts against p; 0.0 if a token with p == 0 occurs."""
    p = p.double()
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    assert counts.numel() == p.numel(), "token outside the vocabulary"
    support = p > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = p[support] * counts.sum()
    assert expected.min() >= 5, "test too small for a chi-square"
    return float(stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue)


def _logits(p: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax (temperature 1) is p; p == 0 -> -inf."""
    return p.float().log()


# ---------------------------------------------------------------- exact maths

def one_step_distribution(p, q, residual=residual_distribution):
    """Exact law of the token one verify step emits: accept x ~ q w.p. a(x), else r."""
    accept = q * acceptance_probability(p, q)
    return accept + (1 - accept.sum()) * residual(p, q)


PAIRS = {
    "generic": (_dist(5, 1, 3, 2, 8, 1, 4, 6), _dist(1, 6, 2, 2, 1, 5, 3, 1)),
    "q_support_where_p_zero": (_dist(5, 5, 0, 0), _dist(1, 2, 3, 4)),
    "p_support_where_q_zero": (_dist(1, 2, 3, 4), _dist(5, 5, 0, 0)),
    "p_equals_q": (_dist(1, 2, 3, 4), _dist(1, 2, 3, 4)),
    "disjoint": (_dist(6, 4, 0, 0), _dist(0, 0, 5, 5)),
    "q_one_hot": (_dist(3, 1, 4, 1, 5), _dist(0, 0, 1, 0, 0)),
    "p_one_hot": (_dist(0, 1, 0, 0), _dist(3, 1, 4, 1)),
    "nearly_equal": (_dist(1, 2, 3, 4), _dist(1, 2, 3, 4.001)),
}


@pytest.mark.parametrize("name", PAIRS)
def test_one_step_distribution_is_exactly_p(name):
    p, q = PAIRS[name]
    out = one_step_distribution(p, q)
    assert torch.allclose(out, p, atol=1e-6, rtol=0), (name, out, p)


def _wrong_residual_p(p, q):
    return p                                                     # forgets to remove q's mass


def _wrong_residual_unclamped(p, q):
    r = (p - q).abs()                                            # |p - q| instead of max(0, p - q)
    return r / r.sum(-1, keepdim=True)


def _wrong_residual_q_minus_p(p, q):
    r = (q - p).clamp_min(0)                                     # wrong way round
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


@pytest.mark.parametrize("wrong", [_wrong_residual_p, _wrong_residual_unclamped, _wrong_residual_q_minus_p])
def test_exact_check_detects_wrong_residual(wrong):
    failures = [name for name, (p, q) in PAIRS.items()
                if not torch.allclose(one_step_distribution(p, q, wrong), p, atol=1e-6, rtol=0)]
    assert "generic" in failures and "q_support_where_p_zero" in failures, failures


def test_acceptance_probability_edge_cases():
    p = torch.tensor([0.2, 0.5, 0.3, 0.0, 0.0])
    q = torch.tensor([0.4, 0.5, 0.0, 0.0, 0.1])
    assert acceptance_probability(p, q).tolist() == pytest.approx([0.5, 1.0, 1.0, 0.0, 0.0])


def test_residual_is_a_distribution_with_fallback():
    p, q = PAIRS["generic"]
    r = residual_distribution(p, q)
    assert (r >= 0).all() and r.sum().item() == pytest.approx(1.0)
    assert (r[p <= q] == 0).all()                                # only where p exceeds q
    p = _dist(1, 2, 3, 4)
    assert torch.equal(residual_distribution(p, p.clone()), p)   # all-zero residual -> p
    assert torch.equal(residual_distribution(p, torch.zeros_like(p)), p)


# ---------------------------------------------------------------- sampled, through verify()

# Per-position targets and drafts for a K = 3 chain, all different, so an off-by-one in
# which row is used for the residual or the bonus shows up. p0 has a zero where q0 has mass.
P_CHAIN = [_dist(45, 25, 15, 10, 5, 0), _dist(10, 30, 5, 25, 20, 10),
           _dist(20, 20, 20, 20, 10, 10), _dist(5, 10, 15, 20, 25, 25)]
Q_CHAIN = [_dist(5, 10, 20, 25, 20, 20), _dist(30, 10, 20, 10, 10, 20), _dist(40, 5, 5, 20, 20, 10)]
N_SAMPLED = 24_000


def _run_chain(k: int, n: int = N_SAMPLED, seed0: int = 7):
    sampling, _ = _batch(n, seed0=seed0)
    first = torch.arange(n) % 97                                  # varied absolute positions
    logits = torch.stack([_logits(p) for p in P_CHAIN[:k + 1]]).expand(n, k + 1, -1)
    q = torch.stack([q.float() for q in Q_CHAIN[:k]]).reshape(k, -1).expand(n, k, -1)
    drafts = _draft(q, sampling, first)
    lens = torch.full((n,), k)
    return verify(logits, drafts, q, lens, sampling, first)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_chain_tokens_follow_target(k):
    res = _run_chain(k)
    assert ((res.num_accepted >= 0) & (res.num_accepted <= k)).all()
    # The token at index j exists iff the first j drafts were accepted. That event only
    # depends on noise at earlier positions, so given it the token must be ~ p_j.
    for j in range(k + 1):
        rows = res.num_accepted >= j
        assert _chisq_pvalue(res.tokens[rows, j], P_CHAIN[j]) > ALPHA, (k, j)
        assert (res.tokens[~rows, j] == -1).all()
    # Acceptance itself is plausible: roughly sum min(p, q) at the first position.
    alpha0 = torch.minimum(P_CHAIN[0], Q_CHAIN[0]).sum().item()
    assert (res.num_accepted >= 1).double().mean().item() == pytest.approx(alpha0, abs=0.02)


@pytest.mark.parametrize("wrong", [_wrong_residual_p, _wrong_residual_unclamped])
def test_chain_detects_wrong_residual(monkeypatch, wrong):
    monkeypatch.setattr(verify_mod, "residual_distribution", wrong)
    res = _run_chain(2)
    assert _chisq_pvalue(res.tokens[:, 0], P_CHAIN[0]) < ALPHA


def test_chain_detects_wrong_acceptance(monkeypatch):
    monkeypatch.setattr(verify_mod, "acceptance_probability", lambda p, q: torch.ones_like(p))
    res = _run_chain(1)
    assert _chisq_pvalue(res.tokens[:, 0], P_CHAIN[0]) < ALPHA


def test_two_token_joint_across_rounds():
    """First two generated tokens, with p2 and q2 depending on the first token.

    Round 1 verifies a K = 2 chain at position 0. Rows rejected at position 0 produced only
    t1, so they run a second round at position 1, as the engine would. Whatever the path,
    (t1, t2) must follow p1(t1) * P2[t1](t2).
    """
    n, vocab = 40_000, 5
    gen = torch.Generator().manual_seed(3)
    p1, q1 = _dist(30, 25, 20, 15, 10), _dist(10, 15, 20, 25, 30)
    p2 = torch.softmax(torch.randn(vocab, vocab, generator=gen, dtype=torch.float64) * 0.6, -1)
    q2 = torch.softmax(torch.randn(vocab, vocab, generator=gen, dtype=torch.float64) * 0.6, -1)
    bonus = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)

    sampling, params = _batch(n, seed0=50_000)
    zero = torch.zeros(n, dtype=torch.long)
    x1 = exponential_race(q1.float().expand(n, -1), sampling.seeds, zero, Stream.DRAFT)
    x2 = exponential_race(q2.float()[x1], sampling.seeds, zero + 1, Stream.DRAFT)
    logits = torch.stack([_logits(p1).expand(n, -1), _logits(p2)[x1], _logits(bonus).expand(n, -1)], 1)
    q = torch.stack([q1.float().expand(n, -1), q2.float()[x1]], 1)
    res = verify(logits, torch.stack([x1, x2], 1), q, torch.full((n,), 2), sampling, zero)
    t1, t2 = res.tokens[:, 0].clone(), res.tokens[:, 1].clone()

    again = (res.num_accepted == 0).nonzero().squeeze(1)
    sub = select_rows(sampling, again, [params[i] for i in again.tolist()])
    prev = t1[again]
    pos = torch.ones(again.numel(), dtype=torch.long)
    y = exponential_race(q2.float()[prev], sub.seeds, pos, Stream.DRAFT)
    logits2 = torch.stack([_logits(p2)[prev], _logits(bonus).expand(again.numel(), -1)], 1)
    res2 = verify(logits2, y.unsqueeze(1), q2.float()[prev].unsqueeze(1),
                  torch.ones(again.numel(), dtype=torch.long), sub, pos)
    t2[again] = res2.tokens[:, 0]

    assert (t2 >= 0).all()
    joint = p1.unsqueeze(1) * p2                                   # [t1, t2]
    assert _chisq_pvalue(t1 * vocab + t2, joint.flatten()) > ALPHA
    # Power check: independence (p1 x marginal of t2) is a different law and must be rejected.
    wrong = p1.unsqueeze(1) * (p1 @ p2).unsqueeze(0)
    assert _chisq_pvalue(t1 * vocab + t2, wrong.flatten()) < ALPHA


# ---------------------------------------------------------------- verify_lens and K = 0

def test_verify_lens_shorter_than_k():
    """Drafts past verify_lens are not proposed: the bonus comes from p, not a residual."""
    n = N_SAMPLED
    sampling, _ = _batch(n, seed0=123)
    first = torch.zeros(n, dtype=torch.long)
    logits = torch.stack([_logits(p) for p in P_CHAIN]).expand(n, 4, -1)
    p = sampling.probs(logits)
    q = torch.stack([q.float() for q in Q_CHAIN]).expand(n, 3, -1).clone()

    # verify_lens = 0 with q0 != p0: nothing accepted, token 0 ~ p0 (a residual would not be).
    drafts = _draft(q, sampling, first)
    res = verify(logits, drafts, q, torch.zeros(n, dtype=torch.long), sampling, first)
    assert (res.num_accepted == 0).all() and (res.tokens[:, 1:] == -1).all()
    assert _chisq_pvalue(res.tokens[:, 0], P_CHAIN[0]) > ALPHA

    # verify_lens = 1 with q0 == p0 (always accepted): bonus at index 1 ~ p1, although q1 != p1.
    q[:, 0] = p[:, 0]
    drafts = _draft(q, sampling, first)
    res = verify(logits, drafts, q, torch.ones(n, dtype=torch.long), sampling, first)
    assert (res.num_accepted == 1).all() and (res.tokens[:, 2:] == -1).all()
    assert torch.equal(res.tokens[:, 0], drafts[:, 0])
    assert _chisq_pvalue(res.tokens[:, 1], P_CHAIN[1]) > ALPHA
    residual = residual_distribution(P_CHAIN[1], Q_CHAIN[1])
    assert _chisq_pvalue(res.tokens[:, 1], residual) < ALPHA     # what q1 != 0 would have given


def test_k_zero_is_plain_sampling():
    n = N_SAMPLED
    sampling, _ = _batch(n, seed0=999)
    first = torch.arange(n) % 13
    logits = _logits(P_CHAIN[3]).expand(n, 1, -1)
    res = verify(logits, torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0, 6),
                 torch.zeros(n, dtype=torch.long), sampling, first)
    assert res.tokens.shape == (n, 1) and (res.num_accepted == 0).all()
    expected = sampling.sample(sampling.probs(logits[:, 0]), first, Stream.TARGET)
    assert torch.equal(res.tokens[:, 0], expected)
    assert _chisq_pvalue(res.tokens[:, 0], P_CHAIN[3]) > ALPHA


# ---------------------------------------------------------------- greedy

def _greedy_case(n=64, k=4, vocab=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k + 1, vocab, generator=gen)
    path = logits.argmax(-1)
    first_miss = torch.randint(0, k + 1, (n,), generator=gen)       # k = no miss
    drafts = path[:, :k].clone()
    rows = (first_miss < k).nonzero().squeeze(1)
    drafts[rows, first_miss[rows]] = (path[rows, first_miss[rows]] + 1) % vocab
    # Drafts after the miss match argmax again: they must not be accepted.
    q = torch.nn.functional.one_hot(drafts, vocab).float()
    return logits, path, drafts, q, first_miss


def _expected_greedy_tokens(path, stop):
    k1 = path.shape[1]
    index = torch.arange(k1).unsqueeze(0)
    return torch.where(index <= stop.unsqueeze(1), path, torch.full_like(path, -1))


def test_all_greedy_follows_argmax_without_noise(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("greedy batch must not draw random numbers")
    monkeypatch.setattr(verify_mod, "uniform", boom)
    logits, path, drafts, q, first_miss = _greedy_case()
    sampling, _ = _batch(len(drafts), temperature=0.0)
    res = verify(logits, drafts, q, torch.full((len(drafts),), 4), sampling, torch.zeros(len(drafts), dtype=torch.long))
    assert torch.equal(res.num_accepted, first_miss)
    assert torch.equal(res.tokens, _expected_greedy_tokens(path, first_miss))


def test_greedy_respects_verify_lens():
    logits, path, _, _, _ = _greedy_case()
    n, k = path.shape[0], path.shape[1] - 1
    drafts = path[:, :k].clone()                                   # all would be accepted
    q = torch.nn.functional.one_hot(drafts, logits.shape[-1]).float()
    lens = torch.arange(n) % (k + 1)
    sampling, _ = _batch(n, temperature=0.0)
    res = verify(logits, drafts, q, lens, sampling, torch.zeros(n, dtype=torch.long))
    assert torch.equal(res.num_accepted, lens)
    assert torch.equal(res.tokens, _expected_greedy_tokens(path, lens))


def test_mixed_greedy_and_sampled_rows():
    logits, path, drafts, _, first_miss = _greedy_case(n=48, k=3, vocab=9, seed=1)
    n, k, vocab = drafts.shape[0], drafts.shape[1], logits.shape[-1]
    params = [SamplingParams(seed=i, temperature=0.0) if i % 2 == 0 else
              SamplingParams(seed=i, temperature=0.8, top_k=5, top_p=0.9) for i in range(n)]
    sampling = SamplingBatch(params, CPU)
    q = torch.softmax(torch.randn(n, k, vocab, generator=torch.Generator().manual_seed(5)), -1)
    greedy = torch.arange(n) % 2 == 0                              # greedy rows ignore q
    first = torch.arange(n) * 3
    lens = torch.full((n,), k)
    res = verify(logits, drafts, q, lens, sampling, first)

    assert torch.equal(res.num_accepted[greedy], first_miss[greedy])
    assert torch.equal(res.tokens[greedy], _expected_greedy_tokens(path, first_miss)[greedy])
    # Sampled rows give exactly what they give in a batch of their own.
    odd = (~greedy).nonzero().squeeze(1)
    alone = verify(logits[odd], drafts[odd], q[odd], lens[odd],
                   select_rows(sampling, odd, [params[i] for i in odd.tolist()]), first[odd])
    assert torch.equal(res.tokens[odd], alone.tokens)
    assert torch.equal(res.num_accepted[odd], alone.num_accepted)
    assert (res.tokens[odd] != _expected_greedy_tokens(path, first_miss)[odd]).any()


# ---------------------------------------------------------------- seeding

def _varied_case(n=16, k=3, vocab=50, seed=11):
    gen = torch.Generator().manual_seed(seed)
    params = [SamplingParams(seed=10 * i + 1, temperature=[0.0, 0.6, 1.0, 1.3][i % 4],
                             top_k=[0, 7, 0, 20][i % 4],
                             top_p=[1.0, 0.8, 0.95][i % 3], min_p=[0.0, 0.02][i % 2]) for i in range(n)]
    logits = torch.randn(n, k + 1, vocab, generator=gen) * 2
    q = torch.softmax(logits[:, :k] + torch.randn(n, k, vocab, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).reshape(n, k)
    lens = torch.randint(0, k + 1, (n,), generator=gen)
    first = torch.randint(0, 1000, (n,), generator=gen)
    return params, logits, drafts, q, lens, first


def test_seeded_runs_reproduce():
    params, logits, drafts, q, lens, first = _varied_case()
    a = verify(logits, drafts, q, lens, SamplingBatch(params, CPU), first)
    b = verify(logits, drafts, q, lens, SamplingBatch(params, CPU), first)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.num_accepted, b.num_accepted)
    # Unseeded requests get fresh seeds: across 64 sampled rows something must differ.
    unseeded = [SamplingParams(temperature=1.0) for _ in range(64)]
    logits = torch.zeros(64, 1, 1000)
    none = torch.zeros(64, 0, dtype=torch.long)
    args = (none, torch.zeros(64, 0, 1000), torch.zeros(64, dtype=torch.long))
    a = verify(logits, *args, SamplingBatch(unseeded, CPU), torch.zeros(64, dtype=torch.long))
    b = verify(logits, *args, SamplingBatch(unseeded, CPU), torch.zeros(64, dtype=torch.long))
    assert not torch.equal(a.tokens, b.tokens)


def test_seeded_row_independent_of_batch():
    params, logits, drafts, q, lens, first = _varied_case()
    full = verify(logits, drafts, q, lens, SamplingBatch(params, CPU), first)
    for b in range(len(params)):
        alone = verify(logits[b:b + 1], drafts[b:b + 1], q[b:b + 1], lens[b:b + 1],
                       SamplingBatch([params[b]], CPU), first[b:b + 1])
        assert torch.equal(alone.tokens[0], full.tokens[b]), b
    perm = torch.randperm(len(params), generator=torch.Generator().manual_seed(0))
    shuffled = verify(logits[perm], drafts[perm], q[perm], lens[perm],
                      SamplingBatch([params[i] for i in perm.tolist()], CPU), first[perm])
    assert torch.equal(shuffled.tokens, full.tokens[perm])


def test_position_keys_the_noise():
    """The same request at another absolute position draws other noise."""
    n = 256
    sampling, _ = _batch(n, seed0=5)
    logits = torch.zeros(n, 1, 100)
    args = (torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0, 100), torch.zeros(n, dtype=torch.long))
    a = verify(logits, *args, sampling, torch.zeros(n, dtype=torch.long)).tokens
    b = verify(logits, *args, sampling, torch.ones(n, dtype=torch.long)).tokens
    assert (a != b).double().mean() > 0.9
