"""Tensor parallelism over NCCL on two NVIDIA GPUs of one host: the CPU module's checks
(test_tensor_parallel.py) with one card per rank. float32, as on the CPU: the claim is that
TP=2 commits TP=1's tokens, and in bfloat16 the ranks' partial sums round differently from
one card's matmul by far more (README "Tensor parallelism"). Skipped below two GPUs."""

from __future__ import annotations

import pytest
import torch

from test_tensor_parallel import DRAFTERS, MAX_TOKENS, run_tp1, run_tp2

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism needs two GPUs")]


@pytest.fixture(scope="module")
def results(smollm2_cache, tmp_path_factory):
    return run_tp1("cuda:0"), run_tp2(smollm2_cache, tmp_path_factory.mktemp("tp2-cuda") / "out.json", "cuda")


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_tp2_nccl_greedy_matches_tp1_plain_decoding(results, drafter):
    tp1, tp2 = results
    assert tp2[drafter]["greedy"] == tp1["none"]["greedy"]
    assert all(len(t) == MAX_TOKENS for t in tp2[drafter]["greedy"])


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_tp2_nccl_seeded_sampling_matches_tp1(results, drafter):
    tp1, tp2 = results
    assert tp2[drafter]["seeded"] == tp1[drafter]["seeded"]
