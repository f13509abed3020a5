"""ascend_dspark.spec.sampling: properties the mutation run (`make mutants`) found no test
pinning. Expectations are closed form or plain torch (argmax, one_hot), never another call
of the code under test. tests/mutants/survivors.md lists which mutant each test kills.
"""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams, Stream
from tests.helpers import select_rows

CPU = torch.device("cpu")


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams().stop == []


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.5), r"temperature must be >= 0, got -0\.5"),
    (dict(top_k=-2), r"top_k must be >= 0 \(0 disables it\), got -2"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
    (dict(top_p=1.25), r"top_p must be in \(0, 1\], got 1\.25"),
    (dict(min_p=1.0), r"min_p must be in \[0, 1\), got 1\.0"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\), got -0\.1"),
    (dict(max_tokens=0), r"max_tokens must be >= 1, got 0"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*63\), got -1"),
    (dict(seed=2**63), r"seed must be in \[0, 2\*\*63\), got 9223372036854775808"),
    (dict(num_speculative_tokens=-1), r"num_speculative_tokens must be >= 0, got -1"),
    (dict(logprobs=-1), r"logprobs must be in \[0, 20\], got -1"),
    (dict(logprobs=21), r"logprobs must be in \[0, 20\], got 21"),
])
def test_invalid_params_name_the_parameter_and_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_boundary_params_are_valid():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=1, seed=0)
    SamplingParams(seed=2**63 - 1, min_p=0.999, top_p=1e-9)
    SamplingParams(num_speculative_tokens=0, logprobs=0)        # no speculation; the chosen token only
    SamplingParams(num_speculative_tokens=1, logprobs=20)


def test_select_keeps_the_size_and_the_rows():
    params = [SamplingParams(temperature=0.5 + i, top_k=i, seed=100 + i) for i in range(5)]
    batch = SamplingBatch(params, CPU)
    rows = torch.tensor([4, 1])
    sub = select_rows(batch, rows, [params[4], params[1]])
    assert sub.size == 2
    assert sub.seeds.tolist() == [104, 101]
    assert sub.top_k.tolist() == [4, 1]
    assert sub.temperature.tolist() == [4.5, 1.5]


def test_greedy_sample_takes_the_argmax_of_the_last_dim():
    """[B, K, V] probabilities of an all-greedy batch: one token per (row, position)."""
    sampling = SamplingBatch([SamplingParams(temperature=0.0)] * 2, CPU)
    probs = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(0))
    tokens = sampling.sample(probs, torch.zeros(2, 3, dtype=torch.long), Stream.TARGET)
    assert tokens.shape == (2, 3)
    assert torch.equal(tokens, probs.argmax(dim=2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_greedy_probs_are_a_float32_one_hot_whatever_the_logits_dtype(dtype):
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = torch.nn.functional.one_hot(logits.float().argmax(-1), 7).float()
    for params in ([SamplingParams(temperature=0.0)] * 2,                          # all greedy
                   [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]):   # mixed
        probs = SamplingBatch(params, CPU).probs(logits)
        assert probs.dtype == torch.float32
        assert torch.equal(probs[0], expected[0])


def test_probs_and_sample_stay_on_the_input_device():
    """On the meta device any tensor made without `device=` lands on the CPU and mixing raises."""
    meta = torch.device("meta")
    params = [SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05, seed=1), SamplingParams(temperature=0.0)]
    sampling = SamplingBatch(params, meta)
    probs = sampling.probs(torch.empty(2, 4, 9, device=meta))
    assert probs.device == meta and probs.shape == (2, 4, 9) and probs.dtype == torch.float32
    tokens = sampling.sample(probs, torch.empty(2, 4, dtype=torch.long, device=meta), Stream.DRAFT)
    assert tokens.device == meta and tokens.shape == (2, 4)


def test_batch_attributes():
    params = [SamplingParams(seed=1), SamplingParams(seed=2), SamplingParams(seed=3)]
    batch = SamplingBatch(params, CPU)
    assert batch.size == 3 and batch.device == CPU
    empty = SamplingBatch([], CPU)
    assert empty.size == 0 and empty.top_k_bounds is None and empty.all_greedy and not empty.any_greedy


def test_greedy_rows_carry_temperature_one_and_top_k_one():
    """Documented: greedy rows hold temperature 1 (no division by 0 in a fused kernel) and
    top_k 1 (inside the range fused top-k kernels accept) in the batch tensors."""
    params = [SamplingParams(temperature=0.0, top_k=50), SamplingParams(temperature=0.7, top_k=3),
              SamplingParams(temperature=0.0)]
    batch = SamplingBatch(params, CPU)
    assert batch.temperature.tolist() == [1.0, pytest.approx(0.7), 1.0]
    assert batch.top_k.tolist() == [1, 3, 1]
    assert batch.greedy.tolist() == [True, False, True]
    assert batch.top_k_bounds == (1, 3)


def test_sampled_top_k_of_one_keeps_only_the_largest_token():
    """top_k = 1 on a sampled row: a one-hot on the argmax (plain torch), even with a
    greedy row beside it."""
    logits = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(5))
    for params in ([SamplingParams(temperature=0.9, top_k=1)],
                   [SamplingParams(temperature=0.9, top_k=1), SamplingParams(temperature=0.0)]):
        probs = SamplingBatch(params, CPU).probs(logits[: len(params)])
        expected = torch.nn.functional.one_hot(logits[0].argmax(-1), 11).float()
        torch.testing.assert_close(probs[0], expected, rtol=0, atol=0)


def test_batch_tensor_dtypes_do_not_follow_the_default_dtype():
    """Backends read these tensors as float32 / int64 / bool, whatever torch's default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        batch = SamplingBatch([SamplingParams(temperature=0.5, top_p=0.9, min_p=0.1, seed=1),
                               SamplingParams(temperature=0.0, seed=2)], CPU)
    finally:
        torch.set_default_dtype(before)
    assert batch.temperature.dtype == batch.top_p.dtype == batch.min_p.dtype == torch.float32
    assert batch.top_k.dtype == batch.seeds.dtype == torch.long
    assert batch.greedy.dtype == torch.bool
