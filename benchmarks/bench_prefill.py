"""Prefill steps replayed from graphs (engine/prefill_graphs.py) against eager prefills.

    python3 benchmarks/bench_prefill.py --out prefill.json                 # a CUDA GPU
    python3 benchmarks/bench_prefill.py --device cpu --out smoke.json      # CPU smoke run: eager, tiny model

SmolLM2-135M-shaped target with random weights (shapes are what matter), plain decoding (a
prefill step's cost does not depend on the drafter's acceptance), one engine with prefill
graphs, measured with them and then with them switched off (its decode steps replay their
graphs either way), so the two modes differ only in how prompt chunks run:

0. replays: every captured prefill and decode graph replayed twice before anything else ran,
   the first replay against the second;
1. step: per (rows, width) shape, the median wall time of an engine step that prefills `rows`
   fresh prompts of `width` tokens and samples their first tokens (each request asks for one
   token, so the step is the whole request), host copy included, after warm-ups;
2. ttft: N requests with seeded prompt lengths arriving together, stepped until each has
   its first token: time to first token per request (mean, p50, p90, max); the scheduler
   chunks them by max_prefill_tokens (and, in the graph mode, the captured shapes) as a
   server would. Twice per mode, alternating.

On a CPU (`--device cpu`) there are no graphs: a tiny model runs the same code paths eagerly,
to check the script, not to measure. JSON goes to --out (and stdout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode import SMOLLM2_135M  # noqa: E402
from benchmarks.bench_step import random_model  # noqa: E402

TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
GPU_SHAPES = [(1, 16), (1, 64), (1, 256), (1, 1024), (1, 2048), (2, 128), (4, 64), (4, 256), (8, 32), (8, 128),
              (8, 256)]
CPU_SHAPES = [(1, 16), (2, 32)]


def make_engine(target, platform, prefill_graphs: bool, max_batch_size: int, max_prefill_tokens: int,
                max_model_len: int):
    from ascend_dspark.engine.engine import Engine

    return Engine(target, None, max_model_len=max_model_len, max_batch_size=max_batch_size, platform=platform,
                  max_prefill_tokens=max_prefill_tokens, prefill_graphs=prefill_graphs, progress=True)


def prompt(length: int, salt: int, vocab: int) -> list[int]:
    return [(31 * i + 7 * salt) % (vocab - 10) + 5 for i in range(length)]


def step_time(engine, rows: int, width: int, repeats: int, vocab: int) -> float:
    """Median seconds of one step prefilling `rows` fresh prompts of `width` tokens (one output token each)."""
    from ascend_dspark.spec.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for repeat in range(repeats + 2):                       # 2 warm-ups
        for r in range(rows):
            engine.add_request(f"s{rows}x{width}-{repeat}-{r}", prompt(width, repeat * rows + r, vocab), params,
                               detokenize=False)
        engine.platform.synchronize()
        start = time.perf_counter()
        engine.step()                                       # ends with the step's host copy read
        times.append(time.perf_counter() - start)
        while engine.has_unfinished():
            engine.step()
    return statistics.median(times[2:])


def ttft(engine, num_requests: int, low: int, high: int, vocab: int) -> dict:
    """N requests added at once; seconds from the add to the step that returned each first token."""
    import random

    from ascend_dspark.spec.sampling import SamplingParams

    rng = random.Random(0)
    lengths = [rng.randint(low, high) for _ in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first: dict[str, float] = {}
    engine.platform.synchronize()
    start = time.perf_counter()
    for i, n in enumerate(lengths):
        engine.add_request(f"t{i}", prompt(n, i, vocab), params, detokenize=False)
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.new_token_ids and delta.request_id not in first:
                first[delta.request_id] = time.perf_counter() - start
    values = sorted(first.values())
    return {"requests": num_requests, "prompt_lengths": [low, high], "mean_ms": 1e3 * statistics.mean(values),
            "p50_ms": 1e3 * values[len(values) // 2], "p90_ms": 1e3 * values[int(0.9 * (len(values) - 1))],
            "max_ms": 1e3 * values[-1]}


def replay_times(captured_graphs, platform) -> dict:
    """Each captured graph replayed twice, as captured (padding rows, which write nothing):
    is a graph's first replay dearer than the next (an upload on first launch)?"""
    first, second = [], []
    for captured in captured_graphs:
        for times in (first, second):
            platform.synchronize()
            start = time.perf_counter()
            captured.graph.replay()
            platform.synchronize()
            times.append(1e3 * (time.perf_counter() - start))
    return {"graphs": len(first), "first_ms_total": sum(first), "second_ms_total": sum(second),
            "first_ms_max": max(first), "second_ms_max": max(second)}


def use_prefill_graphs(engine, graphs) -> None:
    """Switch the engine's prefill graphs on (`graphs`) or off (None); the scheduler's packing
    follows them (Engine._prefill_width), as in an engine built with prefill_graphs=False."""
    engine.runner.prefill_graphs = graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run: eager, tiny model)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per shape (default 20; CPU 2)")
    parser.add_argument("--requests", type=int, default=None, help="requests arriving together (default 64; CPU 6)")
    parser.add_argument("--max-prefill-tokens", type=int, default=2048)
    args = parser.parse_args()

    import torch

    from ascend_dspark.platform import make_platform, set_platform

    platform = set_platform(make_platform(args.device))
    cpu = platform.device.type == "cpu"
    raw = TINY if cpu else SMOLLM2_135M
    target = random_model(raw, torch.float32 if cpu else torch.bfloat16, platform.device)
    shapes = CPU_SHAPES if cpu else GPU_SHAPES
    repeats = args.repeats or (2 if cpu else 20)
    num_requests = args.requests or (6 if cpu else 64)
    low, high = (8, 40) if cpu else (64, 1024)
    max_prefill = min(args.max_prefill_tokens, 64) if cpu else args.max_prefill_tokens
    batch = max(max(r for r, _ in shapes), num_requests)
    modes = ["eager"] if not platform.supports_graphs else ["graph", "eager"]
    result = {"device": platform.describe(), "torch": torch.__version__, "model": "SmolLM2-135M shape, random "
              + ("(tiny on CPU)" if cpu else "bf16"), "max_prefill_tokens": max_prefill, "step": [], "ttft": {}}
    # One engine, its prefill graphs switched off for the eager mode: the decode steps (graph
    # replays) and the memory are the same in both modes, and no second engine captures graphs.
    engine = make_engine(target, platform, not cpu, batch, max_prefill, max(high, max(w for _, w in shapes)) + 64)
    graphs = engine.runner.prefill_graphs
    if graphs is not None:
        result["prefill_graphs"] = len(graphs.graphs)
        result["prefill_graph_mib"] = graphs.graph_bytes / 2**20
        result["replays"] = {"prefill": replay_times(graphs.graphs.values(), platform),
                             "decode": replay_times(engine.runner.graph_runner.graphs.values(), platform)}
    for mode in modes:
        use_prefill_graphs(engine, graphs if mode == "graph" else None)
        for rows, width in shapes:
            if rows * width <= max_prefill:
                row = next((s for s in result["step"] if (s["rows"], s["width"]) == (rows, width)), None)
                if row is None:
                    row = {"rows": rows, "width": width}
                    result["step"].append(row)
                row[f"{mode}_ms"] = 1e3 * step_time(engine, rows, width, repeats, raw["vocab_size"])
    # TTFT twice per mode, alternating, so neither mode is alone in paying first-use costs.
    for run in range(2):
        for mode in modes:
            use_prefill_graphs(engine, graphs if mode == "graph" else None)
            result["ttft"][f"{mode}_{run + 1}"] = ttft(engine, num_requests, low, high, raw["vocab_size"])
    use_prefill_graphs(engine, graphs)
    for row in result["step"]:
        if "graph_ms" in row:
            row["speedup"] = row["eager_ms"] / row["graph_ms"]
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
