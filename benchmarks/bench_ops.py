"""Triton ops vs the eager torch compositions they replace, and a full decode step.

    python3 benchmarks/bench_ops.py --out benchmarks/results/h200_ops.json

Part 1, per op (ops/backends/triton_kernels vs the op's `.reference`), bf16, at SmolLM2-135M
and Qwen3-8B layer shapes, in two regimes: decode (8 rows) and prefill (4096 rows):
- `kernel us`: `triton.testing.do_bench` median with the L2 cache flushed before each call
  (device time of one call); the achieved bandwidth is (bytes read + written) / that time,
  also as a percentage of the device-to-device copy rate (measured here, and of the
  4.21 TB/s anchor measured on the H200). Goal: >= 70 % for the memory-bound ops at >= 8 MB.
- `loop us`: CUDA events around many back-to-back calls (no flush): what one call costs in a
  launch-bound eager decode loop, where a fused kernel saves the reference's extra launches.

Part 2: one forward of a SmolLM2-shaped `DecoderModel` (random bf16 weights, 30 layers) on
the CUDA platform, ops through the registry (Triton) vs `ASCEND_DSPARK_OPS=reference`
(the registry chooses per call, so the variable is set/unset around each run): a 1-token
decode step and an 8-token verification step at batch 1 and 8 with 256 cached positions.

`--smoke` shrinks everything and allows `--device cpu` (with TRITON_INTERPRET=1 for the
kernels) to check the script itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform as host
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

COPY_ANCHOR_TBS = 4.21          # H200 device-to-device copy, shared/reference/h200.md
GOAL_FRACTION, GOAL_MIN_BYTES = 0.70, 8 * 2 ** 20

MODELS = {   # per-layer sizes: hidden, heads, kv heads, head_dim, intermediate
    "smollm2": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536),
    "qwen3_8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288),
}
SMOLLM2_CONFIG = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
    hidden_act="silu", tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
)


# -- timing ------------------------------------------------------------------------------------

class Timer:
    """CUDA: do_bench (flushed, median) and an event-timed loop. CPU (smoke): perf_counter."""

    def __init__(self, device: torch.device, quick: bool) -> None:
        self.cuda = device.type == "cuda"
        self.rep_ms, self.loop_iters = (10, 1) if quick else (60, 200)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def kernel_us(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            return self.loop_us(fn)
        from triton.testing import do_bench

        return 1e3 * do_bench(fn, warmup=10, rep=self.rep_ms, return_mode="median")

    def loop_us(self, fn: Callable[[], object], iters: int | None = None) -> float:
        iters = iters or self.loop_iters
        for _ in range(3 if self.cuda else 1):
            fn()
        self.sync()
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return 1e6 * (time.perf_counter() - t0) / iters
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return 1e3 * start.elapsed_time(end) / iters


def copy_rate_tbs(timer: Timer, device: torch.device, smoke: bool) -> float | None:
    if not timer.cuda:
        return None
    src = torch.empty(2 ** (20 if smoke else 29), dtype=torch.bfloat16, device=device)   # 1 GiB
    dst = torch.empty_like(src)
    us = timer.kernel_us(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e12


# -- part 1: ops -----------------------------------------------------------------------------

def op_cases(model: str, rows: int, device: torch.device, dtype: torch.dtype):
    """(op name, triton fn, reference fn, bytes moved) for one model shape and row count."""
    import ops
    from ops.backends import triton_kernels as tk

    m = MODELS[model]
    h, hq, hkv, d, inter = m["hidden"], m["heads"], m["kv_heads"], m["head_dim"], m["intermediate"]
    es = torch.tensor([], dtype=dtype).element_size()
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    x, res, w = rnd(rows, h), rnd(rows, h), 1.0 + 0.1 * rnd(h)
    gate, up = rnd(rows, inter), rnd(rows, inter)
    q = rnd(1, rows, hq, d)
    positions = torch.arange(rows, device=device)[None]
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    cos, sin = ops.rotary_cos_sin(inv, positions, dtype=dtype)
    cases = [
        ("rms_norm", lambda: tk.rms_norm(x, w, 1e-6), lambda: ops.rms_norm.reference(x, w, 1e-6),
         (2 * rows * h + h) * es),
        ("add_rms_norm", lambda: tk.add_rms_norm(x, res, w, 1e-6), lambda: ops.add_rms_norm.reference(x, res, w, 1e-6),
         (4 * rows * h + h) * es),
        ("silu_and_mul", lambda: tk.silu_and_mul(gate, up), lambda: ops.silu_and_mul.reference(gate, up),
         3 * rows * inter * es),
        ("gelu_tanh_and_mul", lambda: tk.gelu_tanh_and_mul(gate, up),
         lambda: ops.gelu_tanh_and_mul.reference(gate, up), 3 * rows * inter * es),
        ("apply_rotary(q)", lambda: tk.apply_rotary(q, cos, sin), lambda: ops.apply_rotary.reference(q, cos, sin),
         (2 * rows * hq * d + 2 * rows * d) * es),
    ]
    if model == "qwen3_8b":       # per-head q norm (Qwen3 / Gemma3 qk_norm)
        qh, wd = rnd(rows, hq, d), 1.0 + 0.1 * rnd(d)
        cases.append(("rms_norm(q heads)", lambda: tk.rms_norm(qh, wd, 1e-6),
                      lambda: ops.rms_norm.reference(qh, wd, 1e-6), (2 * rows * hq * d + d) * es))
    # KV write: decode = `rows` requests x 1 token; prefill = 1 request x `rows` tokens.
    decode = rows <= 64
    bsz, t = (rows, 1) if decode else (1, rows)
    capacity = 512 if decode else rows
    k, v = rnd(bsz, t, hkv, d), rnd(bsz, t, hkv, d)
    block_size = 16
    kc = torch.zeros(max(bsz, 2) * (capacity // block_size + 1), block_size, hkv, d, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    pos = (torch.full((bsz, 1), 300, device=device) if decode else torch.arange(t, device=device)[None])
    rows = pos + torch.arange(bsz, device=device).unsqueeze(1) * (capacity + block_size)   # one region per request
    cases.append(("kv_write", lambda: tk.kv_write(kc, vc, k, v, rows),
                  lambda: ops.kv_write.reference(kc, vc, k, v, rows), 4 * bsz * t * hkv * d * es))
    return cases


def bench_ops(args, timer: Timer, device: torch.device, dtype: torch.dtype, copy_tbs: float | None) -> list[dict]:
    rows_out = []
    regimes = [("decode", 8), ("prefill", 64 if args.smoke else 4096)]
    for model in args.models:
        for regime, rows in regimes:
            for name, fast, ref, nbytes in op_cases(model, rows, device, dtype):
                fast()                                   # compile outside the timings
                timer.sync()
                t_fast, t_ref = timer.kernel_us(fast), timer.kernel_us(ref)
                l_fast, l_ref = timer.loop_us(fast), timer.loop_us(ref)
                tbs = nbytes / (t_fast * 1e-6) / 1e12
                row = {"op": name, "model": model, "regime": regime, "rows": rows, "bytes": nbytes,
                       "triton_kernel_us": t_fast, "torch_kernel_us": t_ref, "kernel_speedup": t_ref / t_fast,
                       "triton_loop_us": l_fast, "torch_loop_us": l_ref, "loop_speedup": l_ref / l_fast,
                       "triton_tbs": tbs, "pct_of_anchor_copy": 100 * tbs / COPY_ANCHOR_TBS,
                       "pct_of_measured_copy": 100 * tbs / copy_tbs if copy_tbs else None}
                if nbytes >= GOAL_MIN_BYTES:
                    row["meets_70pct_goal"] = tbs >= GOAL_FRACTION * COPY_ANCHOR_TBS
                rows_out.append(row)
                print(f"{model:9s} {regime:7s} {name:18s} triton {t_fast:9.1f} us  torch {t_ref:9.1f} us  "
                      f"loop {l_fast:7.1f}/{l_ref:7.1f} us  {tbs:5.2f} TB/s", flush=True)
    return rows_out


# -- part 2: decode step -----------------------------------------------------------------------

def bench_decode_step(args, timer: Timer, device: torch.device,
                      dtype: torch.dtype) -> tuple[list[dict], dict[str, str]]:
    from ascend_dspark.cache import PagedKVCache
    from ascend_dspark.models import DecoderModel, ModelConfig
    from ops import registry

    raw = dict(SMOLLM2_CONFIG)
    if args.smoke:
        raw.update(num_hidden_layers=2, vocab_size=512)
    cfg = ModelConfig.from_dict(raw)
    torch.manual_seed(0)
    model = DecoderModel(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    context = 256
    rows = []
    for batch in args.decode_batches:
        cache = PagedKVCache.contiguous(cfg.num_layers, batch, 512, cfg.num_kv_heads, cfg.head_dim, dtype, device)
        slots = torch.arange(batch, device=device)
        for tokens in (1, 8):
            ids = torch.randint(0, cfg.vocab_size, (batch, tokens), device=device)
            positions = (context + torch.arange(tokens, device=device))[None].expand(batch, tokens).contiguous()
            valid = torch.ones(batch, tokens, dtype=torch.bool, device=device)

            def step():
                with torch.inference_mode():
                    return model.logits(model(ids, positions, cache, slots, valid).hidden)

            result = {"batch": batch, "tokens": tokens, "layers": cfg.num_layers}
            outs = {}
            for backend in ("triton", "reference"):
                if backend == "reference":
                    os.environ[registry.ENV_VAR] = "reference"
                else:
                    os.environ.pop(registry.ENV_VAR, None)
                try:
                    outs[backend] = step().float()
                    result[f"{backend}_ms"] = timer.loop_us(step, iters=args.step_iters) / 1e3
                finally:
                    os.environ.pop(registry.ENV_VAR, None)
            result["speedup"] = result["reference_ms"] / result["triton_ms"]
            result["max_abs_logit_diff"] = float((outs["triton"] - outs["reference"]).abs().max())
            result["same_argmax"] = bool(torch.equal(outs["triton"].argmax(-1), outs["reference"].argmax(-1)))
            rows.append(result)
            print(f"decode step batch {batch} x {tokens} tok: triton {result['triton_ms']:.2f} ms  "
                  f"reference {result['reference_ms']:.2f} ms  (x{result['speedup']:.2f})", flush=True)
    return rows, registry.DEVICE_DEFAULTS.chosen()


# -- report ------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = ["| model | regime | op | MB | triton us | torch us | speedup | loop triton/torch us | TB/s | % of 4.21 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["ops"]:
        flag = "" if "meets_70pct_goal" not in r else (" ok" if r["meets_70pct_goal"] else " LOW")
        lines.append(f"| {r['model']} | {r['regime']} ({r['rows']}) | {r['op']} | {r['bytes'] / 2**20:.2f} | "
                     f"{r['triton_kernel_us']:.1f} | {r['torch_kernel_us']:.1f} | {r['kernel_speedup']:.2f} | "
                     f"{r['triton_loop_us']:.1f} / {r['torch_loop_us']:.1f} | {r['triton_tbs']:.2f} | "
                     f"{r['pct_of_anchor_copy']:.0f}%{flag} |")
    lines += ["", "| SmolLM2 step (random bf16, 30 layers) | triton ms | reference ms | speedup | same argmax |",
              "|---|---:|---:|---:|---|"]
    for r in results["decode_step"]:
        lines.append(f"| batch {r['batch']} x {r['tokens']} token(s) | {r['triton_ms']:.2f} | "
                     f"{r['reference_ms']:.2f} | {r['speedup']:.2f} | {r['same_argmax']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--step-iters", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; allows --device cpu (TRITON_INTERPRET=1)")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from ascend_dspark.platform import make_platform, set_platform

    platform = set_platform(make_platform(args.device))
    device, dtype = platform.device, torch.bfloat16
    if device.type != "cuda" and not args.smoke:
        parser.error("the benchmark needs a CUDA device (use --smoke to check the script on the CPU)")
    if args.smoke:
        args.step_iters = min(args.step_iters, 2)
    import triton

    timer = Timer(device, quick=args.smoke)
    t0 = time.perf_counter()
    copy_tbs = copy_rate_tbs(timer, device, args.smoke)
    if copy_tbs:
        print(f"device-to-device copy: {copy_tbs:.2f} TB/s (anchor {COPY_ANCHOR_TBS} TB/s)", flush=True)
    results = {"date": dt.date.today().isoformat(), "device": platform.describe(), "host": host.node(),
               "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype),
               "copy_tbs_measured": copy_tbs, "copy_tbs_anchor": COPY_ANCHOR_TBS, "command": " ".join(sys.argv),
               "ops": [], "decode_step": []}
    if not args.skip_ops:
        results["ops"] = bench_ops(args, timer, device, dtype, copy_tbs)
    if not args.skip_step:
        results["decode_step"], results["ops_chosen"] = bench_decode_step(args, timer, device, dtype)
    results["wall_s"] = time.perf_counter() - t0
    table = markdown(results)
    print()
    print(table)
    print(f"\nwall time {results['wall_s']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**results, "markdown": table}, indent=2))


if __name__ == "__main__":
    main()
