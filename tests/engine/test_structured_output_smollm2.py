"""Structured output with the real SmolLM2 and each shipped draft, in-process.

For every drafter one batch holds a greedy and a sampled request with the same JSON schema
(and, for the first, a request without a format): at T=0 the speculative output is token for
token plain constrained decoding (an engine with no drafter); at T>0 it parses and validates
(`jsonschema` is the oracle); the request without a format gets exactly what it gets alone.
"""

from __future__ import annotations

import json

import pytest
import torch

from ascend_dspark.engine.engine import Engine
from ascend_dspark.engine.llm import build_drafter
from ascend_dspark.spec.sampling import SamplingParams
from engine_doubles import one_thread  # noqa: F401  (autouse: one torch thread)

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
from ascend_dspark.spec.grammar import GrammarCompiler  # noqa: E402

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["name", "age", "colour"], "additionalProperties": False}
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def setup(smollm2):
    target, tokenizer = smollm2
    compiler = GrammarCompiler.for_tokenizer(tokenizer.hf, target.config.vocab_size, tokenizer.eos_token_ids)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    grammar = compiler.json_schema(SCHEMA)
    plain = Engine(target, None, tokenizer, max_model_len=256, max_batch_size=1)
    greedy = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, grammar=grammar))[0]
    assert greedy.finish_reason == "stop"
    return target, tokenizer, prompt, grammar, greedy.token_ids


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_constrained_speculation_equals_plain_and_validates(setup, kind):
    target, tokenizer, prompt, grammar, want = setup
    drafter = build_drafter(kind, target, model="default").to(torch.float32).eval()
    engine = Engine(target, drafter, tokenizer, 7, max_model_len=256, max_batch_size=3, speculation="fixed")
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, grammar=grammar),
              SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=5, grammar=grammar)]
    free = SamplingParams(temperature=0, max_tokens=6)
    prompts = [prompt, prompt] + ([prompt] if kind == "dspark" else [])
    outs = engine.generate(prompts, params + ([free] if kind == "dspark" else []))
    assert outs[0].token_ids == want
    assert sum(outs[0].stats.proposal_lengths) > 0
    assert outs[1].finish_reason == "stop"
    jsonschema.validate(json.loads(tokenizer.decode(outs[1].token_ids)), SCHEMA)
    if kind == "dspark":                    # a request without a format beside constrained ones
        assert outs[2].token_ids == engine.generate([prompt], free)[0].token_ids
