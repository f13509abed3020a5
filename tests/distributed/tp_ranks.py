"""One tensor-parallel rank of the tests (run by torchrun, or started with RANK/WORLD_SIZE set).

Every rank builds the same LLMs in the same order; rank 0 generates and writes what it got
to `--out` as JSON (one entry per drafter). `--die-rank R --die-after N`: rank R kills itself
(SIGKILL: no atexit, no goodbye to the group) at its (N+1)-th prefill, mid-generation."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

from ascend_dspark.engine.llm import LLM
from ascend_dspark.spec.sampling import SamplingParams

PROMPTS = [  # the test's TP=1 reference uses the same
    "The capital of France is", "def fibonacci(n):"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--drafters", default="none,dspark,dflash,eagle3")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) | cuda (nccl, one card per rank) | npu (hccl)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--die-rank", type=int, default=None)
    parser.add_argument("--die-after", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if args.die_rank == rank:
        _die_after(args.die_after)
    results = {}
    for drafter in args.drafters.split(","):
        llm = LLM(model="default", drafter=drafter, num_speculative_tokens=3, device=args.device, dtype=args.dtype,
                  max_model_len=128, max_batch_size=4, tensor_parallel_size=int(os.environ["WORLD_SIZE"]),
                  speculation="fixed", progress=False)
        if not llm.is_driver:
            continue
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
        seeded = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=args.max_tokens))
        results[drafter] = {"greedy": [o.token_ids for o in greedy], "seeded": [o.token_ids for o in seeded]}
        llm.close()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    return 0


def _die_after(calls: int) -> None:
    """Die the hard way (no atexit, no closed group) at the (calls+1)-th prefill."""
    from ascend_dspark.engine import runner

    original = runner.ModelRunner.prefill
    count = {"n": 0}

    def prefill(self, *a, **k):
        count["n"] += 1
        if count["n"] > calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *a, **k)
    runner.ModelRunner.prefill = prefill


if __name__ == "__main__":
    sys.exit(main())
