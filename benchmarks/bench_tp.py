"""Decode tokens/s of one (model, drafter) at TP = WORLD_SIZE (1 without torchrun), batch 1
and 16, with the time the ranks' collectives take per step. benchmarks/tp_gpu.sh runs it at
TP=1 and TP=2 side by side and merges the JSON lines.

    python benchmarks/bench_tp.py --model smollm2 --drafter dspark --out tp1.jsonl
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --model qwen3_8b --drafter none --out tp2.jsonl

Models: `smollm2` (the embedded SmolLM2-135M and its shipped drafts) and `qwen3_8b` (Qwen3-8B
shapes, random weights, seeded alike on every rank; its drafter is randomly initialised, so
it accepts ~nothing and measures the cost of drafting). Speculation runs at a fixed depth
K = 7 (`--num-speculative-tokens`), so TP=1 and TP=2 run the same steps. Every batch
generates exactly `--max-tokens` per row (ignore_eos) from a 32-token prompt, after one
warm-up generate. The collectives' time per step comes from a torch.profiler trace of one
more generate on rank 0: the device time of the kernels named nccl* (CUDA) / hccl* (Ascend)
or of the gloo host ops (CPU), over the engine steps of that generate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import QWEN3_8B, random_model  # noqa: E402

PROMPT_LEN = 32
# SmolLM2's prompts are text (its trained drafts accept on text, not on arbitrary ids).
TEXTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
         "Explain how photosynthesis works to a ten-year-old, step by step.",
         "def quicksort(items):\n    \"\"\"Sort a list of integers.\"\"\"\n",
         "Janet has 3 apples and buys 5 more. She gives 2 to her brother. How many apples"]


def build(args, platform, dtype):
    """(target, drafter, tp group or None, tokenizer or None): the target whole, the drafter built against it,
    then the target sharded (the order LLM uses)."""
    import torch

    from ascend_dspark.distributed import join
    from ascend_dspark.drafters import create_drafter
    from ascend_dspark.engine.llm import build_drafter
    from ascend_dspark.models import load_target
    from ascend_dspark.models.parallel import shard_target

    tokenizer = None
    if args.model == "smollm2":
        target, tokenizer = load_target("default", dtype, platform.device)
        drafter = build_drafter(args.drafter, target, 0, "default")
    else:
        target = random_model(QWEN3_8B, dtype, platform.device)
        drafter = None if args.drafter == "none" else create_drafter(args.drafter, target, seed=0)
    if drafter is not None:
        torch.manual_seed(0)
        drafter.to(device=platform.device, dtype=dtype).eval()
    tp = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        tp = join(platform)
        shard_target(target, tp)
    return target, drafter, tp, tokenizer


def collective_ms(prof, backend: str) -> float:
    """Milliseconds the collectives took in a profiler trace (device time where there is a device)."""
    total_us = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        if backend in ("nccl", "hccl") and name.startswith(backend) or backend == "gloo" and "gloo" in name:
            total_us += getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) or e.cpu_time_total
    return total_us / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "qwen3_8b"], default="smollm2")
    parser.add_argument("--drafter", default="none", help="none | dspark | dflash | eagle3")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=7)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True, help="a JSON line per batch size is appended")
    args = parser.parse_args()

    import torch

    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.engine.llm import DTYPES, _rank_device
    from ascend_dspark.engine.tp_calls import follow
    from ascend_dspark.platform import make_platform, set_platform
    from ascend_dspark.spec.sampling import SamplingParams

    world = int(os.environ.get("WORLD_SIZE", "1"))
    platform = set_platform(make_platform(_rank_device(args.device, world)))
    target, drafter, tp, tokenizer = build(args, platform, DTYPES[args.dtype])
    k = args.num_speculative_tokens if drafter is not None else 1
    if tp is not None and not tp.is_driver:
        follow(target, drafter, platform)               # until rank 0 sends stop
        return
    engine = Engine(target, drafter, None, k, PROMPT_LEN + args.max_tokens + 16, max(args.batch_sizes), platform,
                    speculation="fixed")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for batch in args.batch_sizes:
        if tokenizer is not None:
            prompts = [tokenizer.encode(TEXTS[b % len(TEXTS)])[:PROMPT_LEN] for b in range(batch)]
        else:
            prompts = [[(7 * i + 13 * b) % 1000 + 10 for i in range(PROMPT_LEN)] for b in range(batch)]
        engine.generate(prompts, params)                                 # warm-up (and graph capture)
        outs = engine.generate(prompts, params)
        t = engine.timings
        steps = {"n": 0}
        step = engine.step

        def counted():
            steps["n"] += 1
            return step()
        engine.step = counted
        activities = [torch.profiler.ProfilerActivity.CPU]
        if platform.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            engine.generate(prompts, params)
            platform.synchronize()
        engine.step = step
        coll = collective_ms(prof, platform.dist_backend) if tp is not None else 0.0
        accepted = sum(o.stats.mean_accepted_length for o in outs) / len(outs)
        row = dict(model=args.model, drafter=args.drafter, tp=world, batch=batch, dtype=args.dtype,
                   device=platform.describe(), decode_tokens_per_s=round(t.decode_tokens_per_s, 1),
                   tokens_per_s=round(t.tokens_per_s, 1), mean_accepted_length=round(accepted, 3),
                   collective_ms_per_step=round(coll / max(steps["n"], 1), 4), profiled_steps=steps["n"],
                   max_tokens=args.max_tokens, k=k if drafter is not None else 0,
                   date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    if tp is not None:
        tp.send_command(("stop", (), {}))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
