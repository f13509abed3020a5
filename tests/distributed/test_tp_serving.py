"""The server over a tensor-parallel group: `uvicorn serving.app:app` with
ASCEND_DSPARK_SERVE_TENSOR_PARALLEL_SIZE=2 (the container's entrypoint, no torchrun) starts
rank 1 itself, serves the real SmolLM2 through the official client with the tokens of one
process, and answers /health 503 as soon as rank 1 dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest
import torch

from ascend_dspark.engine.llm import LLM
from ascend_dspark.spec.sampling import SamplingParams
from tests.serving.server_process import running_server, server_env

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MAX_TOKENS = 8


def _spawned_ranks(parent: int) -> list[int]:
    """Pids of the rank processes `parent` started (multiprocessing's spawn children, not its
    resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def test_server_on_two_ranks_matches_one_process_and_turns_503_when_a_rank_dies(smollm2_cache, tmp_path):
    torch.set_num_threads(1)
    reference = LLM(model="default", drafter="none", device="cpu", dtype="float32", max_model_len=256,
                    max_batch_size=2, progress=False)
    expected = reference.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))[0].text
    del reference
    env = server_env("default", tensor_parallel_size=2, speculation="fixed", num_speculative_tokens=3,
                     max_model_len=256, max_num_seqs=2)
    with running_server(env, tmp_path / "server.log", startup_timeout=240) as server:
        client = server.client()
        done = client.completions.create(model="default", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert done.choices[0].text == expected
        ranks = _spawned_ranks(server.proc.pid)
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while server.health()[0] == 200:
            assert time.monotonic() < deadline, "/health still 200 15 s after rank 1 died"
            time.sleep(0.2)
        status, body = server.health()
        assert status == 503 and body["status"] == "unavailable"
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="default", prompt=PROMPT, max_tokens=2)
        assert refused.value.status_code == 503
        assert "rank 1" in server.log() and "exited with code -9" in server.log()
