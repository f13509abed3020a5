"""Stop strings need a tokenizer, and cost nothing when a request has none.

Stop strings are matched on decoded text, so the engine decodes a request's output after each
commit, but only for a request that asked for stop strings: the others must never reach the
tokenizer's decode (it is the slow host-side part of a step). A request with stop strings on
an engine without a tokenizer cannot be served as asked; it is refused when it is submitted.
tests/mutants/survivors.md lists the mutants these tests kill.
"""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import EOS, greedy_decode, tiny_target

PROMPTS = [[40, 41, 42], [7, 8]]


class NoDecodeTokenizer:
    """TEST DOUBLE: the tokenizer attributes the engine reads, and a decode that must not run."""

    eos_token_ids = (EOS,)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise AssertionError(f"decode({list(ids)}) called for a request without stop strings")


@pytest.fixture(scope="module")
def target():
    model, _ = tiny_target("llama", dtype=torch.float64)
    return model


def test_no_stop_strings_never_decode(target):
    engine = Engine(target, None, NoDecodeTokenizer(), max_model_len=48, max_batch_size=2)
    outs = engine.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=12),
                                     SamplingParams(temperature=0, max_tokens=12, stop=[])])
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == greedy_decode(target, prompt, 12, eos_token_ids=(EOS,))
        assert out.text is None


def test_stop_strings_without_a_tokenizer_are_refused(target):
    engine = Engine(target, None, None, max_model_len=48, max_batch_size=2)
    with pytest.raises(ValueError, match="tokenizer") as err:
        engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4, stop=["ab"]))
    assert "stop" in str(err.value)
