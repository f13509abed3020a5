"""ops.sampling: properties the mutation run (`make mutants`) found no test pinning.

Each expectation is closed form (worked out by hand below) or a property of the inputs,
never another call of the function under test. tests/mutants/survivors.md lists which
mutant each test kills.
"""

from __future__ import annotations

import torch

from ops.sampling import (apply_min_p, apply_temperature_top_k_top_p, counter_uniform, counter_uniform_vocab,
                          exponential_race)

META = torch.device("meta")


def test_min_p_keeps_a_token_exactly_at_the_floor():
    """min_p = .5 of a largest probability .5: the floor is .25 (exact in float32). Tokens
    *below* it are dropped, so the two .25 tokens stay and the .125 ones go:
    (.5, .25, .125, .125) -> (.5, .25, 0, 0) / .75."""
    probs = torch.tensor([[.5, .25, .125, .125], [.25, .5, .125, .125]])
    out = apply_min_p(probs, torch.tensor([.5, .5]))
    expected = torch.tensor([[2 / 3, 1 / 3, 0., 0.], [1 / 3, 2 / 3, 0., 0.]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_noise_is_float32_whatever_the_default_dtype():
    """The counter noise is float32 by contract (backends must reproduce its bits)."""
    seeds, positions = torch.tensor([3, 4]), torch.tensor([[0, 1], [5, 6]])
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        u = counter_uniform(seeds, positions, 2)
        uv = counter_uniform_vocab(seeds, positions, 3, 5)
    finally:
        torch.set_default_dtype(before)
    assert u.dtype == torch.float32 and u.shape == (2, 2)
    assert uv.dtype == torch.float32 and uv.shape == (2, 2, 5)


def test_sampling_ops_stay_on_the_input_device():
    """On the meta device any tensor made without `device=` lands on the CPU and mixing raises."""
    batch, vocab = 2, 9
    logits = torch.empty(batch, 3, vocab, device=META)
    rows = dict(device=META)
    scaled = apply_temperature_top_k_top_p(logits, torch.empty(batch, **rows),
                                           torch.empty(batch, dtype=torch.long, **rows), torch.empty(batch, **rows))
    assert scaled.device == META and scaled.shape == logits.shape and scaled.dtype == torch.float32
    for top_k, top_p in ((torch.empty(batch, dtype=torch.long, **rows), None), (None, torch.empty(batch, **rows))):
        assert apply_temperature_top_k_top_p(logits, torch.empty(batch, **rows), top_k, top_p).device == META
    assert apply_min_p(logits, torch.empty(batch, **rows)).device == META
    seeds, positions = torch.empty(batch, dtype=torch.long, **rows), torch.empty(batch, 3, dtype=torch.long, **rows)
    noise = counter_uniform_vocab(seeds, positions, 3, vocab)
    assert noise.device == META and noise.shape == (batch, 3, vocab)
    assert counter_uniform(seeds, positions, 1).device == META
    assert exponential_race(logits, noise).device == META


def test_top_p_drops_a_token_whose_mass_above_equals_top_p():
    """Four equal logits: softmax .25 each, exact in float32, so the mass strictly above the
    tokens in sorted order is 0, .25, .5, .75. top_p = .5 keeps a token when that mass is
    < .5: two tokens (the third has exactly .5 above it). top_p = .75 keeps three."""
    logits = torch.zeros(2, 4)
    out = apply_temperature_top_k_top_p(logits, torch.ones(2), None, torch.tensor([.5, .75]))
    assert torch.isfinite(out).sum(-1).tolist() == [2, 3]
