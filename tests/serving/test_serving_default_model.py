"""The server's defaults, for real: SmolLM2-135M-Instruct with its shipped DSpark draft,
answering exactly what the offline `LLM` answers at temperature 0, streamed or not, while
the draft actually speculates."""

from __future__ import annotations

import pytest
import torch

from ascend_dspark import LLM, SamplingParams
from tests.serving.server_process import running_server, server_env

MESSAGES = [{"role": "user", "content": "Name three prime numbers."}]
MAX_MODEL_LEN = 512
MAX_TOKENS = 24


@pytest.mark.slow
def test_default_model_with_its_dspark_draft_matches_the_offline_llm(smollm2_cache, tmp_path):
    # One torch thread in both processes: the same float32 kernels on both sides, and no
    # OpenMP oversubscription on a shared 2-core machine (which makes every step 10x slower).
    env = server_env("default", threads=1, max_model_len=MAX_MODEL_LEN, max_num_seqs=2)
    # K drafts every step: on this CPU the confidence policy rightly decodes plainly (a draft
    # step costs more than its tokens here), and this test is about the draft speculating.
    env["ASCEND_DSPARK_SERVE_SPECULATION"] = "fixed"
    with running_server(env, tmp_path / "server.log") as server:
        client = server.client()
        got = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        stream = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        server.wait_idle()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(model="default", drafter="dspark", device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
                  max_batch_size=2)
        want = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0]
    finally:
        torch.set_num_threads(threads)
    assert got.choices[0].message.content == want.text == streamed
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.speculation["mean_accepted_length"] > 1.0 and got.speculation["num_accepted_tokens"] > 0
