"""Structured output through the real server: SmolLM2 with its shipped DSpark draft
speculating, asked by the official `openai` client for `response_format` json_schema and
vLLM's guided_json / guided_choice, at T=0 and T>0, streamed or not. Every answer parses and
validates against its schema (`jsonschema` is the oracle); at T=0 the answer is token for
token plain constrained decoding, computed offline by an engine with no drafter; a schema
that cannot be compiled is a 400 naming the parameter. (The other drafts, DFlash and Eagle3,
run the same requests in-process: tests/engine/test_structured_output_smollm2.py; one server
per draft would cost a minute each on CI's 2 cores.)"""

from __future__ import annotations

import json

import openai
import pytest
import torch

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams
from tests.serving.server_process import running_server, server_env

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
from ascend_dspark.spec.grammar import GrammarCompiler  # noqa: E402

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 512
MESSAGES = [{"role": "user", "content": "Describe a cat as JSON with its age and its favourite colour."}]
SCHEMA = {"type": "object",
          "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 30},
                         "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["age", "colour"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}}
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def plain(smollm2):
    """Plain constrained greedy decoding (no drafter), offline: (token ids, text, each token's text)."""
    target, tokenizer = smollm2
    compiler = GrammarCompiler.for_tokenizer(tokenizer.hf, target.config.vocab_size, tokenizer.eos_token_ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(target, None, tokenizer, max_model_len=MAX_MODEL_LEN, max_batch_size=1)
        out = engine.generate([tokenizer.apply_chat_template(MESSAGES)],
                              SamplingParams(temperature=0, max_tokens=MAX_TOKENS, grammar=compiler.json_schema(SCHEMA)))
    finally:
        torch.set_num_threads(threads)
    assert out[0].finish_reason == "stop"
    ids = out[0].token_ids
    return ids, tokenizer.decode(ids), [tokenizer.decode([t], skip_special_tokens=False) for t in ids]


@pytest.fixture(scope="module")
def server(smollm2_cache, tmp_path_factory):
    env = server_env("default", threads=1, max_model_len=MAX_MODEL_LEN, max_num_seqs=2, drafter="dspark",
                     speculation="fixed")          # K drafts every step: the drafts are what is checked here
    with running_server(env, tmp_path_factory.mktemp("structured") / "server.log") as s:
        yield s


def test_every_answer_follows_its_schema(server, plain):
    client = server.client()
    greedy = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                            response_format=FORMAT, logprobs=True)
    text = greedy.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    ids, want, pieces = plain
    assert text == want and greedy.usage.completion_tokens == len(ids)
    assert [t.token for t in greedy.choices[0].logprobs.content] == pieces      # token for token
    assert greedy.choices[0].finish_reason == "stop"
    assert greedy.speculation["num_draft_tokens"] > 0

    stream = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                            temperature=1.0, seed=11, response_format=FORMAT, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)

    items = {"type": "array", "items": {"enum": ["red", "blue"]}, "minItems": 1, "maxItems": 2}
    listed = client.completions.create(model="default", prompt="Two colours as a JSON list:", max_tokens=MAX_TOKENS,
                                       temperature=0.8, seed=3, extra_body={"guided_json": items})
    jsonschema.validate(json.loads(listed.choices[0].text), items)

    choice = client.completions.create(model="default", prompt="Is the sky blue? Answer:", max_tokens=8,
                                       temperature=0.7, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")
    server.wait_idle()


def test_bad_formats_are_400s(server):
    client = server.client()
    for body, param in (({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                     "schema": {"type": "nonsense"}}}},
                         "response_format"),
                        ({"guided_json": "{not json"}, "guided_json")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, extra_body=body)
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4,
                                       response_format={"type": "json_schema"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, response_format=FORMAT,
                                       extra_body={"guided_choice": ["a"]})
