"""Tensor parallelism on the CPU: two gloo ranks against one process, with the real SmolLM2.

The two ranks run once per module (torchrun, as users launch them: tests/distributed/tp_ranks.py)
for every drafter and plain decoding; the oracle is this process's own TP=1 engine, which
never touches torch.distributed. Speculation is on (fixed depth 3) for every drafter.

Why exact tokens can be expected at all: the ranks' row-parallel partial sums differ from one
process's matmul in rounding (max |logit difference| about 5e-5 in float32 on this model, see
models/parallel.py), far below the gaps between the top two logits of these prompts; and every
rank sums the same partials in the same order, so the ranks agree bit for bit (the runner
checks the committed tokens of every step across ranks, `TensorParallelGroup.check_same`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ascend_dspark.engine.llm import LLM
from ascend_dspark.spec.sampling import SamplingParams

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("tp_ranks.py")
DRAFTERS = ("none", "dspark", "dflash", "eagle3")
MAX_TOKENS = 8
sys.path.insert(0, str(SCRIPT.parent))
from tp_ranks import PROMPTS  # noqa: E402


def _env(cache: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ASCEND_DSPARK_CACHE": cache, "OMP_NUM_THREADS": "1",
           "ASCEND_DSPARK_DEVICE": "cpu", **extra}
    return env


def run_tp2(cache: str, out: Path, device: str = "cpu") -> dict:
    """What rank 0 of a torchrun TP=2 group generated, per drafter."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--out", str(out), "--drafters", ",".join(DRAFTERS), "--max-tokens", str(MAX_TOKENS), "--device", device]
    env = _env(cache)
    if device != "cpu":
        env.pop("ASCEND_DSPARK_DEVICE")
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def run_tp1(device: str = "cpu") -> dict:
    """The same generations in this one process (no torch.distributed)."""
    results = {}
    for drafter in DRAFTERS:
        llm = LLM(model="default", drafter=drafter, num_speculative_tokens=3, device=device, dtype="float32",
                  max_model_len=128, max_batch_size=4, speculation="fixed", progress=False)
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        seeded = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=MAX_TOKENS))
        results[drafter] = {"greedy": [o.token_ids for o in greedy], "seeded": [o.token_ids for o in seeded]}
    return results


@pytest.fixture(scope="module")
def tp2(smollm2_cache, tmp_path_factory):
    return run_tp2(smollm2_cache, tmp_path_factory.mktemp("tp2") / "out.json")


@pytest.fixture(scope="module")
def tp1(smollm2_cache):
    torch.set_num_threads(1)
    return run_tp1()


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_tp2_greedy_matches_tp1_plain_decoding(tp1, tp2, drafter):
    """T=0 with speculation on: the TP=2 tokens are TP=1 plain decoding's."""
    assert tp2[drafter]["greedy"] == tp1["none"]["greedy"]
    assert all(len(t) == MAX_TOKENS for t in tp2[drafter]["greedy"])


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_tp2_seeded_sampling_matches_tp1(tp1, tp2, drafter):
    """Seeded T>0: the same tokens as one process with the same drafter (the ranks agreed on
    every step's tokens, or rank 1 would have failed the run)."""
    assert tp2[drafter]["seeded"] == tp1[drafter]["seeded"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dead", [1, 0])
def test_a_killed_rank_ends_the_group_with_a_clear_error(smollm2_cache, tmp_path, dead):
    """Two ranks started by hand (torchrun would kill the survivor itself); rank `dead` is
    SIGKILLed mid-generation. The survivor exits non-zero with TensorParallelError's message
    within seconds, not after the collective timeout and never by hanging."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env(smollm2_cache, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ASCEND_DSPARK_TP_TIMEOUT="60")
        cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out.json"), "--drafters", "none",
               "--die-rank", str(dead), "--die-after", "0"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        killed, survivor = procs[dead], procs[1 - dead]
        killed.wait(timeout=120)
        died_at = time.monotonic()
        _, err = survivor.communicate(timeout=45)
        waited = time.monotonic() - died_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert killed.returncode == -9
    assert survivor.returncode not in (0, None), err[-3000:]
    assert "TensorParallelError" in err and "another rank died or stopped answering" in err, err[-3000:]
    assert waited < 30, f"the survivor took {waited:.0f}s to notice"
    assert not (tmp_path / "out.json").exists()
