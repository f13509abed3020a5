"""ops.verify: properties the mutation run (`make mutants`) found no test pinning.

Each expectation is closed form (worked out by hand below) or a property of the inputs,
never another call of the function under test. tests/mutants/survivors.md lists which
mutant each test kills.
"""

from __future__ import annotations

import math

import torch

from ops.verify import residual_distribution, verify_chain, verify_chain_greedy

META = torch.device("meta")


def _meta_inputs(batch: int, k: int, vocab: int):
    """verify_chain's inputs as meta tensors: shapes and dtypes only, no data."""
    return dict(target_probs=torch.empty(batch, k + 1, vocab, device=META),
                draft_tokens=torch.empty(batch, k, dtype=torch.long, device=META),
                draft_probs=torch.empty(batch, k, vocab, device=META),
                verify_lens=torch.empty(batch, dtype=torch.long, device=META),
                accept_uniform=torch.empty(batch, k, device=META),
                seeds=torch.empty(batch, dtype=torch.long, device=META),
                first_position=torch.empty(batch, dtype=torch.long, device=META))


def test_verify_chain_allocates_on_the_input_device():
    """Every tensor the op makes must live on its inputs' device (CUDA / NPU in production).
    On the meta device a tensor made without `device=` lands on the CPU and mixing raises."""
    batch, k, vocab = 3, 4, 6
    for greedy in (None, torch.empty(batch, dtype=torch.bool, device=META)):
        num_accepted, tokens = verify_chain(**_meta_inputs(batch, k, vocab), residual_stream=3, greedy=greedy)
        assert num_accepted.device == META and tokens.device == META
        assert num_accepted.shape == (batch,) and tokens.shape == (batch, k + 1)
        assert num_accepted.dtype == torch.long and tokens.dtype == torch.long


def test_verify_chain_greedy_allocates_on_the_input_device():
    batch, k, vocab = 2, 3, 5
    num_accepted, tokens = verify_chain_greedy(torch.empty(batch, k + 1, vocab, device=META),
                                               torch.empty(batch, k, dtype=torch.long, device=META),
                                               torch.empty(batch, dtype=torch.long, device=META))
    assert num_accepted.device == META and tokens.device == META
    assert num_accepted.shape == (batch,) and tokens.shape == (batch, k + 1)
    assert num_accepted.dtype == torch.long and tokens.dtype == torch.long


def test_residual_normalises_each_row_on_its_own():
    """norm(max(0, p - q)) per row of a [B, K, V] batch, by hand:
    row (0,0): p - q = (-.5, .5, 0)    -> (0, 1, 0)
    row (0,1): p - q = (0, -.2, .2)    -> (0, 0, 1)
    row (1,0): p - q = (.1, .3, -.4)   -> (.25, .75, 0)
    row (1,1): p == q, no mass         -> p itself (.2, .3, .5)"""
    p = torch.tensor([[[.5, .5, 0.], [.2, .2, .6]], [[.3, .4, .3], [.2, .3, .5]]], dtype=torch.float64)
    q = torch.tensor([[[1., 0., 0.], [.2, .4, .4]], [[.2, .1, .7], [.2, .3, .5]]], dtype=torch.float64)
    expected = torch.tensor([[[0., 1., 0.], [0., 0., 1.]], [[.25, .75, 0.], [.2, .3, .5]]], dtype=torch.float64)
    torch.testing.assert_close(residual_distribution(p, q), expected, rtol=0, atol=1e-12)


def test_verify_lens_past_k_counts_as_k_for_the_bonus():
    """A verify length past K means every computed draft is proposed (it is clamped to K):
    when all are accepted the bonus comes from p at position K, not from a residual
    against the last draft's q.

    K = 1, V = 3. Position 0: p0 = q0 = (.5, .5, 0), draft 0, acceptance min(1, p/q) = 1,
    so every row accepts. Bonus p1 = (0, .5, .5): token 1 half the time. (A residual against
    q0 would be max(0, p1 - q0) = (0, 0, .5): never token 1.)"""
    rows = 4000
    p = torch.tensor([[.5, .5, 0.], [0., .5, .5]]).expand(rows, 2, 3).contiguous()
    q = torch.tensor([[.5, .5, 0.]]).expand(rows, 1, 3).contiguous()
    drafts = torch.zeros(rows, 1, dtype=torch.long)
    for verify_len in (1, 2, 5):
        num_accepted, tokens = verify_chain(
            p, drafts, q, torch.full((rows,), verify_len), torch.full((rows, 1), 0.5),
            torch.arange(rows) + 7, torch.zeros(rows, dtype=torch.long), 3)
        assert num_accepted.tolist() == [1] * rows
        assert (tokens[:, 0] == 0).all()
        ones = int((tokens[:, 1] == 1).sum())
        assert set(tokens[:, 1].tolist()) <= {1, 2}
        # Binomial(4000, 1/2): mean 2000, sd ~31.6; 6 sd either way.
        assert abs(ones - rows / 2) < 6 * math.sqrt(rows) / 2, (verify_len, ones)
