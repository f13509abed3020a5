"""The validation split holds out whole prompts (all their samples), ~2% of them, fixed by
the prompt id alone, and is checked disjoint from the evaluation prompts."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ascend_dspark.training.dataset import Sample
from ascend_dspark.training.prompts import Prompt
from ascend_dspark.training.shards import prompt_key
from ascend_dspark.training.split import assert_disjoint_from_eval, split_samples


def _samples(n_prompts, k=3):
    return [Sample(torch.tensor([1, 2]), torch.tensor([False, True]), f"p:{i}#{j}", f"p:{i}", prompt_key(f"text {i}"))
            for i in range(n_prompts) for j in range(k)]


def _held_out_oracle(prompt_id, fraction=0.02, seed=0):
    """The documented rule: sha256("val:<seed>:<prompt id>"), first 8 bytes little-endian / 2**64 < fraction."""
    d = hashlib.sha256(f"val:{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(d[:8], "little") / 2**64 < fraction


def test_split_by_prompt_disjoint_and_about_two_percent():
    samples = _samples(5000)
    train, val = split_samples(samples, 0.02)
    val_prompts = {s.prompt_id for s in val}
    assert val_prompts.isdisjoint({s.prompt_id for s in train})
    assert len(train) + len(val) == len(samples)
    assert all(sum(s.prompt_id == p for s in val) == 3 for p in list(val_prompts)[:10])   # all samples of a prompt
    assert val_prompts == {f"p:{i}" for i in range(5000) if _held_out_oracle(f"p:{i}")}
    assert 70 <= len(val_prompts) <= 130                                 # 2% of 5000 = 100
    # Fixed by the id alone: more data does not move a prompt across.
    _, val_more = split_samples(_samples(6000), 0.02)
    assert {s.prompt_id for s in val_more} >= val_prompts
    assert split_samples(samples, 0.0) == (samples, [])
    with pytest.raises(ValueError):
        split_samples(samples, 1.0)


def test_disjoint_from_eval_prompts():
    samples = _samples(20, k=1)
    evals = [Prompt("gsm8k-test:0", "gsm8k-test", [{"role": "user", "content": "Something else"}])]
    assert_disjoint_from_eval(samples, evals)
    evals.append(Prompt("mtbench:7", "mtbench", [{"role": "user", "content": "  TEXT   3 "}]))    # normalised equal
    with pytest.raises(ValueError, match=r"p:3#0 == mtbench:7"):
        assert_disjoint_from_eval(samples, evals)
