"""Where a decode step's time goes: device kernel time by kind, idle device time, and the
host's Python per step, from torch.profiler and cProfile traces of the engine decoding.

    python benchmarks/profile_step.py --out benchmarks/results/issue16/profile_h100.json

Three parts, each in a fresh process (graphs of one part never share a pool with another's):

1. `qwen3_8b`: the Qwen3-8B shape (random bf16 weights) decoding at batch 1 after a 512-token
   prompt, whole-step graphs with overlap: per step, the kernel time of the matmuls (and the
   bandwidth they reach over the weights they read), attention, norms, the rest, and the
   device's idle time, against the floor (weight bytes over this device's measured bandwidth).
2. `smollm2`: the SmolLM2-135M shape, plain decoding and random DFlash and DSpark drafts at
   K = 7 (speculation "fixed"), batch 1 and 16: the same breakdown, so the DSpark - DFlash
   difference is attributed to kernels (the Markov head, per-position sampling, ...).
3. `host`: cProfile of the engine's `step()` at batch 1, SmolLM2 shape, plain decoding: the
   host functions that take a step's time (what multi-step launches or a leaner step remove).

Needs a CUDA GPU. `--plot result.json` draws the stacked per-step breakdown (next to it, .png).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Kernel name fragments -> kind, first match wins (lower-case names).
KINDS = (
    ("matmul", ("_linear_kernel", "gemv", "gemm", "cutlass", "xmma", "cublas", "matmul")),
    ("attention", ("attention", "attn", "flash")),
    ("markov", ("markov",)),
    ("norm", ("rms", "norm")),
    ("rotary / kv write", ("rotary", "rope", "kv_write", "scatter", "index_put")),
    ("sampling", ("softmax", "argmax", "topk", "sort", "exponential", "multinomial", "philox", "rand", "max_kernel",
                  "cumsum", "scan")),
    ("copy", ("memcpy", "memset", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p in low for p in parts)), "other elementwise")


def kernel_breakdown(prof, steps: int) -> dict:
    """Per step: microseconds of kernel time by kind, the device's busy time (the union of
    kernel intervals), the wall span from the first to the last kernel, and the top kernels."""
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy",
                                                                                          "gpu_memset")]
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e["name"])] = by_kind.get(kind_of(e["name"]), 0.0) + e["dur"]
        by_name[e["name"][:90]] = by_name.get(e["name"][:90], 0.0) + e["dur"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    busy, end = 0.0, None
    for start, stop in spans:
        if end is None or start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    wall = spans[-1][1] - spans[0][0]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"steps": steps, "wall_us_per_step": wall / steps, "busy_us_per_step": busy / steps,
            "idle_us_per_step": (wall - busy) / steps, "busy_fraction": busy / wall,
            "kernels_per_step": len(events) / steps,
            "kind_us_per_step": {k: v / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_us_per_step": {k: v / steps for k, v in top}}


def profiled_decode(platform, target, drafter, batch: int, prompt_len: int, steps: int) -> dict:
    """Decode `steps` tokens per row (K = 7 drafts, fixed, when a drafter is given) under the
    profiler, after a warm-up run and the prefill (untraced)."""
    from torch.profiler import ProfilerActivity, profile

    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.spec.sampling import SamplingParams

    engine = Engine(target, drafter, None, 7, max_model_len=prompt_len + steps + 64, max_batch_size=batch,
                    platform=platform, speculation="fixed" if drafter is not None else None)
    prompts = [[(13 * i + 7 * b) % 1000 + 10 for i in range(prompt_len)] for b in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    engine.generate(prompts, params)                                   # warm-up: graphs, caches
    for b, prompt in enumerate(prompts):
        engine.add_request(f"p{b}", prompt, params, detokenize=False)
    engine.step()                                                      # the prefill, untraced
    done = 0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished():
            engine.step()
            done += 1
        platform.synchronize()
    return kernel_breakdown(prof, done)


def host_profile(platform, target, steps: int = 256) -> dict:
    """cProfile of `engine.step()` at batch 1 (plain decoding, graphs + overlap): wall per step
    and the functions with the most cumulative and own time."""
    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.spec.sampling import SamplingParams

    engine = Engine(target, None, max_model_len=512, max_batch_size=1, platform=platform)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    engine.generate([list(range(100, 164))], params)
    engine.add_request("p", list(range(100, 164)), params, detokenize=False)
    engine.step()
    prof = cProfile.Profile()
    n, t0 = 0, time.perf_counter()
    prof.enable()
    while engine.has_unfinished():
        engine.step()
        n += 1
    prof.disable()
    wall = time.perf_counter() - t0
    rows = {}
    for sort in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(sort).print_stats(25)
        rows[sort] = out.getvalue()
    return {"steps": n, "wall_us_per_step_profiled": wall / n * 1e6, "cumulative": rows["cumulative"],
            "tottime": rows["tottime"]}


def run_part(part: str) -> dict:
    import torch

    from ascend_dspark.drafters import create_drafter
    from ascend_dspark.platform import make_platform
    from benchmarks.bench_decode import SMOLLM2_135M
    from benchmarks.bench_step import QWEN3_8B, bandwidth_bytes_per_s, random_model

    platform = make_platform("cuda")
    warm = torch.ones(16, 16, device=platform.device)
    (warm @ warm).sum().item()
    if part == "qwen3_8b":
        bandwidth = bandwidth_bytes_per_s(platform.device)
        torch.cuda.empty_cache()
        big = random_model(QWEN3_8B, torch.bfloat16, platform.device)
        weight_bytes = sum(t.numel() * t.element_size() for t in big.parameters() if t.dim() == 2)
        embed_bytes = big.model.embed_tokens.weight.numel() * 2
        res = profiled_decode(platform, big, None, 1, 512, 64)
        read = weight_bytes - embed_bytes        # the embedding is gathered, not streamed
        res.update({"bandwidth_bytes_per_s": bandwidth, "weights_streamed_gb": read / 1e9,
                    "floor_us": read / bandwidth["floor"] * 1e6,
                    "matmul_bandwidth_bytes_per_s": read / (res["kind_us_per_step"].get("matmul", 1) / 1e6)})
        return res
    small = random_model(SMOLLM2_135M, torch.bfloat16, platform.device)
    if part == "host":
        return host_profile(platform, small)
    res = {}
    for kind in ("none", "dflash", "dspark"):
        for batch in (1, 16):
            drafter = None if kind == "none" else create_drafter(kind, small).to(platform.device, torch.bfloat16).eval()
            res[f"{kind}_batch{batch}"] = profiled_decode(platform, small, drafter, batch, 64, 48)
    return res


PARTS = ("qwen3_8b", "smollm2", "host")


def plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    rows = {"8B b1 plain": res["qwen3_8b"]}
    rows.update({f"135M b{b} {k}": res["smollm2"][f"{k}_batch{b}"] for b in (1, 16)
                 for k in ("none", "dflash", "dspark")})
    kinds = [k for k, _ in KINDS] + ["other elementwise", "idle"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 6]})
    for ax, names in ((axes[0], ["8B b1 plain"]), (axes[1], [n for n in rows if n.startswith("135M")])):
        bottom = [0.0] * len(names)
        for kind in kinds:
            vals = [(rows[n]["idle_us_per_step"] if kind == "idle" else rows[n]["kind_us_per_step"].get(kind, 0.0)) / 1e3
                    for n in names]
            ax.bar(names, vals, bottom=bottom, label=kind, hatch="//" if kind == "idle" else None,
                   color="white" if kind == "idle" else None, edgecolor="grey")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("ms per step")
        ax.tick_params(axis="x", rotation=30)
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle(f"Where a decode step's time goes ({res.get('device', '')}, {res.get('date', '')})")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--part", choices=PARTS)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--plot", type=Path, help="plot a result JSON and exit")
    args = p.parse_args()
    if args.plot:
        plot(args.plot)
        return
    if args.part:
        print("PART " + json.dumps(run_part(args.part)), flush=True)
        return
    res = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}
    for part in args.parts.split(","):
        proc = subprocess.run([sys.executable, __file__, "--part", part], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PART ")]
        if proc.returncode or not lines:
            print(f"part {part} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        res[part] = json.loads(lines[-1][5:])
        print(part, json.dumps({k: v for k, v in res[part].items() if k not in ("cumulative", "tottime")}, indent=1),
              flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1))
    if args.out and all(p in res for p in ("qwen3_8b", "smollm2")):
        plot(args.out)


if __name__ == "__main__":
    main()
