"""Which counter key each verification draw uses, pinned exactly (fast, no model).

Chain verification draws three kinds of random numbers per request, each keyed by
(seed, absolute position, stream) so that a seeded request reproduces in any batch:
- the acceptance coin of draft k: ACCEPT noise at first_position + k;
- the residual after a rejection at index s, or the bonus when s = verify_len: one
  exponential race with TARGET noise at first_position + s.
Here `verify()` is recomputed row by row from those keys and the closed-form rule
(accept x iff u < min(1, p(x)/q(x)); residual norm(max(0, p - q)), or p for the bonus),
and must match token for token, for ragged verify_lens (drafts past a request's length
are never proposed) and mixed greedy / sampled rows. The same recomputation with any key
moved (one position on, or another stream) must not match: the pin is sharp.
"""

from __future__ import annotations

import pytest
import torch

import ops
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams, Stream
from ascend_dspark.spec.verify import verify

B, K, V = 128, 3, 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Row-by-row recomputation is many tiny ops: one thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def case():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K + 1, V, generator=gen) * 1.5
    # q close to p for most rows, so every stop index 0..K (bonus included) occurs often.
    q = torch.softmax(logits[:, :K] + 0.6 * torch.randn(B, K, V, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).view(B, K)
    lens = torch.randint(0, K + 1, (B,), generator=gen)
    lens[: B // 2] = K
    first = torch.randint(0, 5000, (B,), generator=gen)
    params = [SamplingParams(temperature=0.0 if i % 9 == 4 else 1.0, seed=(i * 7919) + (2**40 if i % 3 else 0))
              for i in range(B)]
    return logits, q, drafts, lens, first, params


def recompute(logits, q, drafts, lens, first, params, accept_shift=0, final_shift=0,
              accept_stream=Stream.ACCEPT, final_stream=Stream.TARGET):
    """verify(), one row at a time, from the keys and the closed-form rule."""
    n_out, tok_out = [], []
    for b, prm in enumerate(params):
        seed = torch.tensor([prm.seed])
        p = torch.softmax(logits[b].float(), -1)                          # T = 1, no filters
        n = int(lens[b])
        s = 0
        while s < n:
            x = int(drafts[b, s])
            if prm.greedy:
                ok = x == int(logits[b, s].argmax())
            else:
                u = float(ops.counter_uniform(seed, first[b:b + 1] + s + accept_shift, int(accept_stream))[0])
                ok = u < min(1.0, float(p[s, x] / q[b, s, x]))
            if not ok:
                break
            s += 1
        if prm.greedy:
            final = int(logits[b, s].argmax())
        else:
            weights = p[s]
            if s < n:
                r = (p[s] - q[b, s]).clamp_min(0)
                weights = r if r.sum() > 1e-8 else p[s]
            noise = ops.counter_uniform_vocab(seed, first[b:b + 1] + s + final_shift, int(final_stream), V)
            final = int(ops.exponential_race(weights.unsqueeze(0), noise)[0])
        n_out.append(s)
        tok_out.append(drafts[b, :s].tolist() + [final] + [-1] * (K - s))
    return torch.tensor(n_out), torch.tensor(tok_out)


def test_verification_draws_use_the_documented_keys():
    logits, q, drafts, lens, first, params = case()
    res = verify(logits, drafts, q, lens, SamplingBatch(params, torch.device("cpu")), first)
    n, tokens = recompute(logits, q, drafts, lens, first, params)
    assert torch.equal(res.num_accepted, n)
    assert torch.equal(res.tokens, tokens)
    # Every stop index, bonus included, was exercised by sampled rows.
    sampled = torch.tensor([not p.greedy for p in params])
    assert set(n[sampled & (lens == K)].tolist()) == set(range(K + 1))


@pytest.mark.parametrize("moved", [dict(accept_shift=1), dict(accept_shift=-1), dict(final_shift=1),
                                   dict(accept_stream=Stream.DRAFT), dict(final_stream=Stream.DRAFT),
                                   dict(final_stream=Stream.ACCEPT)])
def test_a_moved_key_is_noticed(moved):
    logits, q, drafts, lens, first, params = case()
    res = verify(logits, drafts, q, lens, SamplingBatch(params, torch.device("cpu")), first)
    _, tokens = recompute(logits, q, drafts, lens, first, params, **moved)
    assert (res.tokens != tokens).any(dim=1).sum() > B // 10
