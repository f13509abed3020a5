"""The server through the official `openai` client, against a real uvicorn process serving a
tiny random Llama with a (randomly initialised) DSpark draft: what the endpoints return,
that it equals the offline engine, and that streaming changes nothing but the framing.

One server for the module (started and stopped here); every test leaves it idle.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import openai
import pytest

from ascend_dspark import LLM, SamplingParams
from tests.serving.server_process import (
    API_KEY,
    MAX_MODEL_LEN,
    running_server,
    server_env,
)

PROMPTS = ["hello there", "The sky is", "1 2 3"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # K drafts every step: the speculation fields checked here need steps that draft (the
    # confidence policy would rightly stop drafting with this random draft).
    env = server_env(tiny_model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=16, queue_size=64, max_n=8,
                     api_key=API_KEY, max_body_bytes=65536, served_model_name="tiny", speculation="fixed")
    with running_server(env, tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv
    log = srv.log()
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    """The same model and draft, run by the offline engine in this process."""
    return LLM(model=str(tiny_model_dir), drafter="dspark", device="cpu", dtype="float32",
               max_model_len=MAX_MODEL_LEN, max_batch_size=4)


@pytest.fixture
def client(server):
    return server.client()


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts, reasons, usage_chunk = {}, {}, None
    for chunk in stream:
        if not chunk.choices:
            usage_chunk = chunk
        for ch in chunk.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, usage_chunk


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, health = server.health()
    assert status == 200 and health["status"] == "ok" and health["engine"]["accounting_ok"]
    status, version = server.json("GET", "/version")
    assert status == 200 and version["drafter"] == "dspark" and version["num_speculative_tokens"] == 7


def test_completions_match_the_offline_engine_at_t0(client, offline):
    for prompt in PROMPTS:
        want = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0]
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_matches_the_offline_engine_at_t0(client, offline):
    want = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=32))[0]
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=32, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == len(want.token_ids)
    spec = got.speculation
    assert spec["num_verify_steps"] >= 1 and 0 < spec["num_draft_tokens"] <= 7 * spec["num_drafts"]
    assert spec["mean_accepted_length"] >= 1.0


def test_prompt_lists_and_token_ids(client, offline):
    """A list of prompts times n gives choices prompt-major (index = prompt * n + choice);
    token ids are taken as they are."""
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
              for p in PROMPTS[:2]]
    both = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=12, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [single[0], single[0], single[1], single[1]]
    ids = offline.tokenizer.encode(PROMPTS[0])
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0).choices[0].text == single[0]


def test_seeded_sampling_reproduces_the_offline_engine(client, offline):
    want = offline.generate(PROMPTS[0], SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24))[0]
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0.9, top_p=0.9,
                                    seed=11)
    assert got.choices[0].text == want.text


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5, "top_k": 20}])
def test_streamed_text_equals_non_streamed(client, kind, sampling):
    sampling = dict(sampling)
    extra = {"top_k": sampling.pop("top_k")} if "top_k" in sampling else {}
    common = {"model": "tiny", "max_tokens": 30, "n": 2, "extra_body": extra, **sampling}
    if kind == "chat":
        create, arg = client.chat.completions.create, {"messages": CHAT}
    else:
        create, arg = client.completions.create, {"prompt": PROMPTS[1]}
    whole = create(**arg, **common)
    texts, reasons, usage_chunk = _stream_text(create(**arg, **common, stream=True,
                                                      stream_options={"include_usage": True}))
    for choice in whole.choices:
        assert texts[choice.index] == (choice.message.content if kind == "chat" else choice.text)
        assert reasons[choice.index] == choice.finish_reason
    assert usage_chunk is not None and usage_chunk.usage.model_dump() == whole.usage.model_dump()
    assert usage_chunk.speculation == whole.speculation


def test_n_choices_differ_and_choice_0_is_the_n1_answer(client):
    one = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=1.0, seed=7)
    many = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=1.0, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == one.choices[0].text
    assert len({c.text for c in many.choices}) == 3
    assert many.usage.prompt_tokens == one.usage.prompt_tokens           # the prompt counts once
    assert many.usage.completion_tokens > one.usage.completion_tokens
    again = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=1.0, seed=7, n=3)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]
    other = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=1.0, seed=8)
    assert other.choices[0].text != one.choices[0].text


def test_stop_strings_cut_the_text_streamed_or_not(client):
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[10:12]
    want = full[:full.find(stop)]
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    texts, reasons, _ = _stream_text(client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert texts[0] == want and reasons[0] == "stop"


def test_speculation_can_be_turned_off_per_request(client):
    base = {"model": "tiny", "messages": CHAT, "max_tokens": 24, "temperature": 0}
    spec = client.chat.completions.create(**base)
    plain = client.chat.completions.create(**base, extra_body={"num_speculative_tokens": 0})
    capped = client.chat.completions.create(**base, extra_body={"num_speculative_tokens": 2})
    assert plain.choices[0].message.content == spec.choices[0].message.content == capped.choices[0].message.content
    assert spec.speculation["num_draft_tokens"] > 0
    assert plain.speculation["num_draft_tokens"] == 0 and plain.speculation["mean_accepted_length"] == 1.0
    assert 0 < capped.speculation["num_draft_tokens"] <= 2 * capped.speculation["num_drafts"]


def test_logprobs_in_both_layouts(client):
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset) == got.usage.completion_tokens
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)     # keyed by text: tokens may share one
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:                          # greedy: the chosen token is the most likely one
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
    texts, _, _ = _stream_text(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8,
                                                         temperature=0, logprobs=2, stream=True))
    assert texts[0] == got.choices[0].text


def test_metrics_use_vllm_names(server, client):
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, raw = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {s.name + (f"[{s.labels['position']}]" if "position" in s.labels else ""): s.value
               for fam in text_string_to_metric_families(raw.decode()) for s in fam.samples}
    for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:generation_tokens_total"):
        assert samples[name] > 0, name
    assert "vllm:spec_decode_num_accepted_tokens_total" in samples
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in samples
    assert samples["ascend_dspark:kv_blocks_total"] > 0


BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "tiny", "prompt": ', {}, 400, "not valid JSON"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, {}, 404, "gpt-9"),
    ("negative max_tokens", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -3}, {}, 400, "max_tokens"),
    ("temperature", "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "temperature": 7}, {}, 400, "temperature"),
    ("huge n", "/v1/completions", {"model": "tiny", "prompt": "hi", "n": 100000}, {}, 400, "at most 8"),
    ("oversized body", "/v1/completions", {"model": "tiny", "prompt": "x" * 100_000}, {}, 413, "65536 bytes"),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, {}, 400, "messages"),
    ("wrong API key", "/v1/completions", {"model": "tiny", "prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, "API key"),
    ("no API key", "/v1/models", None, {"Authorization": ""}, 401, "API key"),
    ("prompt too long", "/v1/completions", {"model": "tiny", "prompt": "y" * 300}, {}, 400, f"{MAX_MODEL_LEN} tokens"),
    ("unsupported field", "/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"1": 2}}, {}, 400, "logit_bias"),
    ("penalty", "/v1/completions", {"model": "tiny", "prompt": "hi", "presence_penalty": 1.0}, {}, 400, "penalties"),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, {}, 400, "role"),
    ("top_p zero", "/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, {}, 400, "top_p"),
    ("not an object", "/v1/completions", b"[1, 2]", {}, 400, "JSON object"),
    ("unknown route", "/v2/nothing", None, {}, 404, "/v2/nothing"),
]


@pytest.mark.parametrize("name, path, body, headers, status, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_in_openai_shape(server, name, path, body, headers, status, needle):
    method = "GET" if body is None else "POST"
    got, _, raw = server.request(method, path, body, headers=headers)
    assert got == status, raw

    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err
    assert "Traceback" not in raw.decode()


def test_bad_input_through_the_client_raises_typed_errors(server, client):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key-xyz").models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=4).choices[0].finish_reason
    server.wait_idle()


def _aborted(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    raw = server.request("GET", "/metrics")[2].decode()
    return sum(s.value for fam in text_string_to_metric_families(raw) for s in fam.samples
               if s.name == "vllm:request_success_total" and s.labels.get("finished_reason") == "abort")


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_hangs_up_is_aborted_at_once(server, client):
    """Streaming and not: the request is aborted (not run to max_tokens) and its blocks freed."""
    before = _aborted(server)
    stream = client.completions.create(model="tiny", prompt="long", max_tokens=240, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    _wait_for(lambda: _aborted(server) == before + 1)
    body = json.dumps({"model": "tiny", "prompt": "long", "max_tokens": 240, "temperature": 0, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        _wait_for(lambda: server.health()[1]["engine"]["in_flight"] == 1)
    _wait_for(lambda: _aborted(server) == before + 2)
    server.wait_idle()


async def _one_client(server, i: int, rng: random.Random, outcome: dict) -> None:
    client = server.async_client()
    disconnect_after = rng.randint(0, 6) if i % 3 == 0 else None
    try:
        if i % 2:
            stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q{i}"}],
                                                          max_tokens=rng.randint(8, 48), temperature=1.0,
                                                          seed=i, stream=True, extra_body={"ignore_eos": True})
        else:
            stream = await client.completions.create(model="tiny", prompt=f"prompt {i}", max_tokens=rng.randint(8, 48),
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = 0
        async for chunk in stream:
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                await stream.close()
                outcome[i] = "disconnected"
                return
            for ch in chunk.choices:
                if ch.finish_reason:
                    outcome[i] = ch.finish_reason
        outcome.setdefault(i, "no finish")
    except openai.APIStatusError as exc:
        outcome[i] = f"HTTP {exc.status_code}"
    finally:
        await client.close()


def test_64_streaming_clients_a_third_disconnecting(server, client):
    rng = random.Random(0)
    outcome: dict[int, str] = {}

    async def main():
        await asyncio.gather(*(_one_client(server, i, random.Random(rng.random()), outcome) for i in range(64)))

    asyncio.run(asyncio.wait_for(main(), 120))
    assert len(outcome) == 64
    finished = [o for i, o in outcome.items() if i % 3]
    assert all(o == "length" for o in finished), outcome
    assert all(o in ("disconnected", "length") for i, o in outcome.items() if i % 3 == 0), outcome
    engine = server.wait_idle()
    assert _aborted(server) >= 1
    assert engine["kv_blocks_used"] == 0 and engine["free_slots"] == engine["slots_total"] == 16
    assert " 500 " not in server.log() and " 503 " not in server.log()
    assert client.completions.create(model="tiny", prompt="still there?", max_tokens=4).choices[0].text is not None


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client):
    # vLLM's stream option, which guidellm sends on every request.
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content and all(c.usage is not None for c in content)
    counts = [c.usage.completion_tokens for c in content]
    assert counts == sorted(counts) and counts[0] >= 1
    final = chunks[-1].usage
    assert not chunks[-1].choices and final.completion_tokens >= counts[-1]
    assert {c.usage.prompt_tokens for c in content} == {final.prompt_tokens}
