"""The cost of one step against the hardware's floor, and how busy the device stays.

    python benchmarks/bench_step.py --out step.json

0. The floor: this device's memory bandwidth, measured in this process (a 2 GiB device copy,
   and a cuBLAS GEMV over a 1 GiB matrix; the faster counts), so an H100 and an H200 are
   each held to their own, over the bytes a step streams: every weight but the input
   embedding (one row of it is gathered).
1. Qwen3-8B-shaped target (random bf16 weights; shapes are what matter), with the
   batch-invariant matmul and with cuBLAS (`ASCEND_DSPARK_OPS=reference:linear`) side by
   side: a plain decode step at batch 1 (whole-step graph replay, 64 steps after a 512-token
   prompt; with the engine's overlap of host and device work, and without) against the
   weight-read floor, and target forwards replayed as CUDA graphs at the same context:
   1 token, a verify of 8 tokens, and batches of 8 and 32 one-token rows.
2. SmolLM2-135M shape (random weights): the step time of DSpark and DFlash drafts (K = 7,
   random drafts: a step costs the same whatever it accepts) at batch 1 and 16, and the
   device busy fraction while decoding at batch 1 (graph replay, with and without overlap,
   one step per launch and `--steps-per-launch` plain steps per launch, engine/multistep.py):
   the union of GPU kernel intervals over the wall time from the first to the last kernel of
   the decode, from a torch.profiler trace.

Each part runs in its own process (one command runs them all and writes one JSON): CUDA
graphs captured and freed part after part in one process shared a memory pool, and a later
capture then failed inside the caching allocator.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def random_model(raw: dict, dtype, device):
    """Built on the device (its default initialisation runs there: seconds, not minutes)."""
    import torch

    from ascend_dspark.models.config import ModelConfig
    from ascend_dspark.models.decoder import DecoderModel

    torch.manual_seed(0)
    with torch.device(device):
        model = DecoderModel(ModelConfig.from_dict(raw))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def decode_step(platform, target, context: int, steps: int, overlap: bool | None = None) -> float:
    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.spec.sampling import SamplingParams

    engine = Engine(target, None, max_model_len=context + steps + 8, max_batch_size=1, platform=platform,
                    overlap=overlap, decode_steps_per_launch=1)          # one step, against the floor
    prompt = [(7 * i) % 1000 + 10 for i in range(context)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    engine.generate([prompt], params)                                   # warm-up
    engine.generate([prompt], params)
    return engine.timings.decode_s / max(engine.timings.generated_tokens - 1, 1)


def bandwidth_bytes_per_s(device) -> dict:
    """Memory bandwidth measured here: a device copy (bytes read + written) and a cuBLAS GEMV
    (bytes of the matrix), each the best of 10 after a warm-up."""
    import torch

    def best(fn, moved: int) -> float:
        fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(10):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return moved / min(times)

    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy = best(lambda: dst.copy_(src), 2 * src.numel() * src.element_size())
    del dst
    matrix = src.view(16384, -1)
    x = torch.randn(1, matrix.shape[1], dtype=matrix.dtype, device=device)
    gemv = best(lambda: x @ matrix.t(), matrix.numel() * matrix.element_size())
    return {"copy": copy, "gemv": gemv, "floor": max(copy, gemv)}


def forward_ms(platform, target, width: int, context: int, batch: int = 1, reps: int = 50) -> float:
    """One target forward of `batch` rows of `width` tokens at `context`, replayed from a CUDA graph."""
    import torch

    from ascend_dspark.cache import PagedKVCache

    cfg, dev = target.config, platform.device
    cache = PagedKVCache.contiguous(cfg.num_layers, batch, context + width, cfg.num_kv_heads, cfg.head_dim,
                                    next(target.parameters()).dtype, dev)
    ids = torch.zeros(batch, width, dtype=torch.long, device=dev)
    positions = (context + torch.arange(width, device=dev)).unsqueeze(0).expand(batch, -1)
    slots = torch.arange(batch, dtype=torch.long, device=dev)
    valid = torch.ones(batch, width, dtype=torch.bool, device=dev)
    graph = platform.graph()
    with torch.inference_mode():
        graph.capture(lambda: target.logits(target(ids, positions, cache, slots, valid).hidden))
        platform.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        platform.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def drafter_step_ms(platform, target, kind: str, batch: int, steps: int = 48) -> float:
    """Mean decode step (draft + verify + bookkeeping) with a random `kind` draft at K = 7
    ("none": plain decoding)."""
    from ascend_dspark.drafters import create_drafter
    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.spec.sampling import SamplingParams

    drafter = None if kind == "none" else create_drafter(kind, target).to(
        platform.device, next(target.parameters()).dtype).eval()
    engine = Engine(target, drafter, None, 7, max_model_len=512, max_batch_size=batch, platform=platform,
                    speculation="fixed")
    prompts = [[(13 * i + 7 * b) % 1000 + 10 for i in range(64)] for b in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    engine.generate(prompts, params)                                     # warm-up
    outs = engine.generate(prompts, params)
    return engine.timings.decode_s / max(o.stats.num_steps for o in outs) * 1e3


def busy_fraction(platform, target, steps: int = 64, overlap: bool | None = None, per_launch: int = 1) -> float:
    from torch.profiler import ProfilerActivity, profile

    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.spec.sampling import SamplingParams

    engine = Engine(target, None, max_model_len=256, max_batch_size=1, platform=platform, overlap=overlap,
                    decode_steps_per_launch=per_launch)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    engine.generate([list(range(100, 132))], params)
    engine.add_request("warm", list(range(100, 132)), SamplingParams(temperature=0.0, max_tokens=steps + 4,
                                                                       ignore_eos=True), detokenize=False)
    engine.step()
    engine.step()                                       # prefill and the first decode step, untraced
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished():
            engine.step()
        platform.synchronize()
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(trace))
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in json.loads(trace.read_text())["traceEvents"]
                     if e.get("cat") == "kernel")
    busy, end = 0.0, None
    for start, stop in kernels:
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / (kernels[-1][1] - kernels[0][0])


PARTS = ("qwen3_8b:batch_invariant", "qwen3_8b:cublas", "smollm2")


def run_part(part: str, per_launch: int = 4) -> dict:
    """One part in this process (the parent runs each in a fresh one: graphs captured and
    freed in one process otherwise share a memory pool across parts)."""
    import torch

    from ascend_dspark.platform import make_platform
    from benchmarks.bench_decode import SMOLLM2_135M

    platform = make_platform("cuda")
    warm = torch.ones(16, 16, device=platform.device)
    (warm @ warm).sum().item()                      # cuBLAS initialised before any capture
    if part.startswith("qwen3_8b"):
        if part.endswith("cublas"):
            os.environ["ASCEND_DSPARK_OPS"] = "reference:linear"
        bandwidth = bandwidth_bytes_per_s(platform.device)
        torch.cuda.empty_cache()
        big = random_model(QWEN3_8B, torch.bfloat16, platform.device)
        weight_bytes = sum(t.numel() * t.element_size() for t in big.parameters())
        # A step streams every weight except the input embedding, of which it gathers one row.
        streamed = weight_bytes - big.model.embed_tokens.weight.numel() * big.model.embed_tokens.weight.element_size()
        floor_ms = streamed / bandwidth["floor"] * 1e3
        step_ms = decode_step(platform, big, context=512, steps=64) * 1e3
        step_sync_ms = decode_step(platform, big, context=512, steps=64, overlap=False) * 1e3
        one, eight = forward_ms(platform, big, 1, 512), forward_ms(platform, big, 8, 512)
        batch8, batch32 = forward_ms(platform, big, 1, 512, batch=8), forward_ms(platform, big, 1, 512, batch=32)
        return {"bandwidth_bytes_per_s": bandwidth, "weight_gb": weight_bytes / 1e9, "streamed_gb": streamed / 1e9,
                "floor_ms": floor_ms,
                "decode_step_ms": step_ms, "step_vs_floor": step_ms / floor_ms,
                "decode_step_no_overlap_ms": step_sync_ms, "forward_1_ms": one, "forward_1_vs_floor": one / floor_ms,
                "verify_8_ms": eight, "verify8_vs_step1": eight / one, "batch_8_ms": batch8,
                "batch_8_vs_floor": batch8 / floor_ms, "batch_32_ms": batch32, "batch_32_vs_floor": batch32 / floor_ms}
    small = random_model(SMOLLM2_135M, torch.bfloat16, platform.device)
    res = {f"{kind}_batch{b}_ms": drafter_step_ms(platform, small, kind, b)
           for kind in ("none", "dflash", "dspark") for b in (1, 16)}
    for b in (1, 16):
        res[f"dspark_vs_dflash_batch{b}"] = res[f"dspark_batch{b}_ms"] / res[f"dflash_batch{b}_ms"]
    res["busy_fraction"] = busy_fraction(platform, small)
    res["busy_fraction_no_overlap"] = busy_fraction(platform, small, overlap=False)
    if per_launch > 1:
        res["steps_per_launch"] = per_launch
        res["busy_fraction_multistep"] = busy_fraction(platform, small, per_launch=per_launch)
        res["busy_fraction_multistep_no_overlap"] = busy_fraction(platform, small, overlap=False, per_launch=per_launch)
    return res


def main() -> None:
    import subprocess

    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--part", choices=PARTS, help="run one part here and print its JSON (the parent runs all)")
    p.add_argument("--steps-per-launch", type=int, default=4,
                   help="the busy fraction also with this many plain steps per launch (1: only one per launch)")
    args = p.parse_args()
    if args.part:
        print("PART " + json.dumps(run_part(args.part, args.steps_per_launch)), flush=True)
        return
    res = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "command": "python " + " ".join(sys.argv)}
    for part in PARTS:
        proc = subprocess.run([sys.executable, __file__, "--part", part, "--steps-per-launch",
                               str(args.steps_per_launch)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PART ")]
        if proc.returncode or not lines:
            raise SystemExit(f"part {part} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res[part] = json.loads(lines[-1][5:])
        print(part, json.dumps(res[part], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
