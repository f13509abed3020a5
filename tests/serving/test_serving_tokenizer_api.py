"""/tokenize, /detokenize and /tokenizer_info of a real default-model server, against the
model's tokenizer loaded separately by transformers; the served-name aliases; and what
lm-eval's remote-tokenizer detection asks of the server (its own check, run for real)."""

from __future__ import annotations

import pytest

from tests.serving.conftest import DEFAULT_MAX_MODEL_LEN

pytestmark = pytest.mark.slow
TEXTS = ["Natalia sold clips to 48 of her friends in April.", "  spaces\tand\nnewlines, ünïcödé 😀 ", "x"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 6?"}]


def test_tokenize_matches_the_tokenizer_and_round_trips(default_server, hf_tokenizer):
    for text in TEXTS:
        status, body = default_server.json("POST", "/tokenize", {"model": "smol", "prompt": text,
                                                                 "return_token_strs": True})
        assert status == 200, body
        assert body["tokens"] == hf_tokenizer.encode(text, add_special_tokens=True)
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == DEFAULT_MAX_MODEL_LEN
        assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(body["tokens"])
        status, back = default_server.json("POST", "/detokenize", {"tokens": body["tokens"]})
        assert status == 200 and back == {"prompt": text}
    status, body = default_server.json("POST", "/tokenize", {"prompt": "hi", "add_special_tokens": False})
    assert status == 200 and body["tokens"] == hf_tokenizer.encode("hi", add_special_tokens=False)
    assert body["token_strs"] is None


def test_tokenize_chat_form_renders_the_template(default_server, hf_tokenizer):
    for generation_prompt in (True, False):
        status, body = default_server.json("POST", "/tokenize", {"messages": MESSAGES,
                                                                 "add_generation_prompt": generation_prompt})
        assert status == 200, body
        text = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
        assert body["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False)
    # What the chat endpoint would run: /v1/chat/completions's prompt_tokens agree.
    got = default_server.client().chat.completions.create(model="smol", messages=MESSAGES, max_tokens=1,
                                                          temperature=0)
    assert got.usage.prompt_tokens == default_server.json("POST", "/tokenize", {"messages": MESSAGES})[1]["count"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, None),
    ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404, "model"),
    ("/tokenize", {"prompt": "x", "bogus": 1}, 400, "bogus"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
])
def test_bad_tokenizer_requests_get_clear_errors(default_server, path, body, status, param):
    got, error = default_server.json("POST", path, body)
    assert got == status, error
    assert set(error) == {"error"} and error["error"]["message"] and "Traceback" not in error["error"]["message"]
    if param:
        assert error["error"]["param"] == param


def test_tokenizer_info_is_what_lm_eval_detects(default_server, hf_tokenizer):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    status, info = default_server.json("GET", "/tokenizer_info")
    assert status == 200
    assert info["eos_token"] == hf_tokenizer.eos_token and info["bos_token"] == hf_tokenizer.bos_token
    assert info["chat_template"] == hf_tokenizer.chat_template and info["tokenizer_class"]
    assert info["model_max_length"] == DEFAULT_MAX_MODEL_LEN
    url = default_server.url + "/v1/completions"
    assert check_remote_tokenizer_support(url)
    remote = RemoteTokenizer(url)
    assert remote.eos_token_id == hf_tokenizer.eos_token_id
    assert remote.encode(TEXTS[0]) == hf_tokenizer.encode(TEXTS[0], add_special_tokens=False)
    assert remote.apply_chat_template(MESSAGES) == hf_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)


def test_every_served_name_works_and_an_unknown_one_is_404(default_server):
    import openai

    client = default_server.client()
    assert [m.id for m in client.models.list().data] == ["smol", "smollm2-alias"]
    answers = []
    for name in ("smol", "smollm2-alias"):
        got = client.completions.create(model=name, prompt="The capital of France is", max_tokens=4, temperature=0)
        assert got.model == name
        answers.append(got.choices[0].text)
    assert answers[0] == answers[1]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="default", prompt="x", max_tokens=1)
    assert err.value.body["code"] == "model_not_found"
