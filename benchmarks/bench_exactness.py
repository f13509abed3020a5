"""Is greedy speculation token-identical to plain decoding in half precision? Side by side
in one process: the batch-invariant matmul (the default on CUDA) and cuBLAS for every
matmul (`ASCEND_DSPARK_OPS=reference:linear`, what ran before).

For each mode: plain greedy decoding of held-out GSM8K test prompts at batch 16 is the
oracle; every shipped draft at K = 1..7 (batch 16), and plain and DSpark at batch 1, count
the prompts whose tokens equal it. A diagnosis then feeds the same 8 tokens after a prompt
as one 8-row verify forward and as 8 one-row decode steps, and names the first module (in
execution order) whose output differs between the two.

    python benchmarks/bench_exactness.py --dtype bfloat16 --prompts 32 --max-tokens 256 --ks 1,4,7 \
        --out benchmarks/results/exactness/h100_bf16.json
    python benchmarks/bench_exactness.py --plot benchmarks/results/exactness/h100_bf16.json

Needs a CUDA GPU (the cuBLAS comparison is the point); the plot runs anywhere.
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

MODES = {"batch-invariant matmul": None, "cuBLAS matmul": "reference:linear"}
KINDS = ("dspark", "dflash", "eagle3")


def identical(got: list[list[int]], want: list[list[int]]) -> tuple[int, list[int]]:
    """(prompts identical, first differing position of each prompt that is not)."""
    firsts = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(got, want) if a != b]
    return len(got) - len(firsts), firsts


def generate(model, drafter, tokenizer, prompts, batch, k, params):
    from ascend_dspark.engine.engine import Engine

    engine = Engine(model, drafter, tokenizer, k, max_model_len=640, max_batch_size=batch, speculation="fixed")
    return [o.token_ids for o in engine.generate(prompts, params)]


def first_divergence(model, prompt: list[int], following: list[int]) -> dict:
    """Feed `following` after `prompt` as one verify forward and as one-row decode steps;
    the first module (execution order) whose output differs, and by how much."""
    import torch

    from ascend_dspark.cache import PagedKVCache
    from ascend_dspark.models.decoder import Attention, DecoderLayer, GatedMLP, RMSNorm
    from ascend_dspark.models.merged import MergedLinear

    cfg, device = model.config, model.lm_head.weight.device
    watched = {m: name for name, m in model.named_modules()
               if isinstance(m, (RMSNorm, MergedLinear, Attention, GatedMLP, DecoderLayer))}
    order, seen = [], {}

    def record(module, _inputs, output):
        name = watched[module]
        out = torch.cat(output, dim=-1) if isinstance(output, tuple) else output
        if name not in seen:
            order.append(name)
        seen.setdefault(name, []).append(out.detach().float().clone())

    hooks = [m.register_forward_hook(record) for m in watched]
    try:
        runs = {}
        for how, chunks in (("verify", [following]), ("decode", [[t] for t in following])):
            cache = PagedKVCache.contiguous(cfg.num_layers, 1, len(prompt) + len(following) + 16, cfg.num_kv_heads,
                                            cfg.head_dim, model.lm_head.weight.dtype, device)
            slot = torch.zeros(1, dtype=torch.long, device=device)
            start = 0
            with torch.inference_mode():
                for i, ids in enumerate([prompt] + chunks):
                    if i == 1:
                        order.clear()
                        seen.clear()
                    pos = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
                    model(torch.tensor([ids], device=device), pos, cache, slot, torch.ones_like(pos, dtype=torch.bool))
                    start += len(ids)
            runs[how] = {name: torch.cat(outs, dim=1) for name, outs in seen.items()}, list(order)
    finally:
        for h in hooks:
            h.remove()
    verify, names = runs["verify"]
    decode, _ = runs["decode"]
    for name in names:
        diff = (verify[name] - decode[name]).abs()
        if diff.max() > 0:
            token = int(diff.flatten(2).amax(-1)[0].nonzero()[0])
            return {"module": name, "token": token, "max_abs_diff": float(diff.max()),
                    "modules_differing": sum(bool((verify[n] - decode[n]).abs().max() > 0) for n in names),
                    "modules": len(names)}
    return {"module": None, "modules": len(names)}


def run_mode(model, tokenizer, prompts, args) -> dict:
    from ascend_dspark.engine.llm import build_drafter
    from ascend_dspark.spec.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    plain = generate(model, None, tokenizer, prompts, 16, 7, params)
    rows = []
    for kind in KINDS:
        drafter = build_drafter(kind, model, model="default").to(model.lm_head.weight.dtype)
        for k in args.ks:
            same, firsts = identical(generate(model, drafter, tokenizer, prompts, 16, k, params), plain)
            rows.append({"drafter": kind, "k": k, "batch": 16, "identical": same, "first_divergence": firsts})
            print(f"  {kind} K={k} batch 16: {same}/{len(prompts)} identical", flush=True)
        if kind == "dspark":
            same, firsts = identical(generate(model, drafter, tokenizer, prompts, 1, 7, params), plain)
            rows.append({"drafter": kind, "k": 7, "batch": 1, "identical": same, "first_divergence": firsts})
    same, firsts = identical(generate(model, None, tokenizer, prompts, 1, 7, params), plain)
    rows.append({"drafter": "none", "k": 0, "batch": 1, "identical": same, "first_divergence": firsts})
    diagnosis = [first_divergence(model, prompts[i], plain[i][:8]) for i in range(min(4, len(prompts)))]
    return {"rows": rows, "diagnosis": diagnosis, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--ks", type=lambda v: [int(k) for k in v.split(",")], default=list(range(1, 8)),
                        help="draft lengths to check, comma-separated (default 1..7)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="plot a result JSON (next to it, .png) and exit")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    import torch

    from ascend_dspark.models import load_target
    from ascend_dspark.training.prompts import load_prompts

    model, tokenizer = load_target("default", getattr(torch, args.dtype), "cuda")
    prompts = [tokenizer.apply_chat_template(p.messages) for p in load_prompts("gsm8k-test", args.prompts, seed=2)]
    result = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "dtype": args.dtype, "prompts": args.prompts, "max_tokens": args.max_tokens,
              "command": "python " + " ".join(sys.argv), "modes": {}}
    for mode, setting in MODES.items():
        print(f"{mode} (ASCEND_DSPARK_OPS={setting or ''})", flush=True)
        if setting:
            os.environ["ASCEND_DSPARK_OPS"] = setting
        else:
            os.environ.pop("ASCEND_DSPARK_OPS", None)
        result["modes"][mode] = run_mode(model, tokenizer, prompts, args)
        print(json.dumps(result["modes"][mode]["diagnosis"]), flush=True)
    os.environ.pop("ASCEND_DSPARK_OPS", None)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(table(result))


def table(result: dict) -> str:
    """Markdown: one row per (drafter, K, batch), one column per mode."""
    modes = list(result["modes"])
    n = result["prompts"]
    lines = ["| drafter | K | batch | " + " | ".join(modes) + " |", "|---|---|---|" + "---|" * len(modes)]
    for i, row in enumerate(result["modes"][modes[0]]["rows"]):
        cells = [f"{result['modes'][m]['rows'][i]['identical']}/{n}" for m in modes]
        lines.append(f"| {row['drafter']} | {row['k']} | {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    fig, axes = plt.subplots(1, len(KINDS), figsize=(12, 3.5), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for mode, res in result["modes"].items():
            rows = [r for r in res["rows"] if r["drafter"] == kind and r["batch"] == 16]
            ax.plot([r["k"] for r in rows], [r["identical"] / result["prompts"] for r in rows], "o-", label=mode)
        ax.set_title(f"{kind}, batch 16")
        ax.set_xlabel("K (draft tokens verified)")
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("prompts token-identical to plain")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{result['device']}, {result['dtype']}, {result['prompts']} GSM8K prompts x {result['max_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
