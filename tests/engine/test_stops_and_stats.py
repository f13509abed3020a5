"""Stop strings, EOS, stats bookkeeping and bad requests at the engine level."""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.engine.engine import Engine
from ascend_dspark.engine.outputs import RequestStats, merge_stats
from ascend_dspark.models.tokenizer import Tokenizer
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import tiny_target, tiny_tokenizer


@pytest.fixture(scope="module")
def engine():
    target, _ = tiny_target("llama", dtype=torch.float64)
    return Engine(target, None, Tokenizer(tiny_tokenizer()), max_model_len=48, max_batch_size=2)


def test_stop_string_truncates_text(engine):
    prompt = [40, 41, 42]
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    text = engine.tokenizer.decode(free.token_ids)
    stop = text[5:7]
    assert len(stop) == 2
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]


def test_max_model_len_ends_with_length(engine):
    out = engine.generate([list(range(3, 40))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 48 - 37


@pytest.mark.parametrize("prompt, message", [([], "empty prompt"), ([1, 999], "token ids must be in"),
                                             (list(range(60)), "max_model_len")])
def test_bad_prompts_raise_named_errors(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate([prompt], SamplingParams())


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_k": -1}, {"max_tokens": 0},
                                    {"min_p": 1.0}])
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_stats_count_the_bonus_and_conditional_acceptance():
    stats = RequestStats()
    stats.record(num_accepted=3, verified=3)     # all accepted: 3 + bonus
    stats.record(num_accepted=1, verified=3)     # position 1 rejected
    stats.record(num_accepted=0, verified=3)     # position 0 rejected
    assert stats.accepted_lengths == [4, 2, 1] and stats.mean_accepted_length == pytest.approx(7 / 3)
    assert stats.position_reached == [3, 2, 1] and stats.position_accepted == [2, 1, 1]
    assert stats.acceptance_per_position == pytest.approx([2 / 3, 1 / 2, 1.0])
    pooled = merge_stats([stats, stats])
    assert pooled.mean_accepted_length == stats.mean_accepted_length and pooled.position_reached == [6, 4, 2]
