"""Plain vs speculative generation throughput for one target, side by side in one run.

    python benchmarks/bench_generate.py --device cpu --max-tokens 64 --out results.json

Every drafter runs on the same loaded target, the same prompts and the same greedy
settings (ignore_eos, so every configuration generates the same number of tokens); one
warm-up generate precedes each timed one. `--speculation confidence fixed` runs each drafter
under both policies. Reports decode tokens/s, the mean accepted length, the steps run at
each draft depth and the ratio to plain decoding. `--plot` turns a results JSON into a PNG.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform as host
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in a short paragraph why the sky is blue.",
    "List five countries in Europe and their capitals.",
    "Give me three tips for writing clear technical documentation.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
]


def run(args: argparse.Namespace) -> dict:
    import torch

    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.engine.llm import build_drafter
    from ascend_dspark.engine.outputs import merge_stats
    from ascend_dspark.models import load_target
    from ascend_dspark.platform import make_platform, set_platform
    from ascend_dspark.spec.sampling import SamplingParams

    platform = set_platform(make_platform(args.device))
    dtype = getattr(torch, args.dtype) if args.dtype else platform.default_dtype()
    target, tokenizer = load_target(args.model, dtype, platform.device)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    runs = [(kind, policy) for kind in args.drafters
            for policy in (["fixed"] if kind == "none" else args.speculation)]
    for batch in args.batch_sizes:
        for kind, policy in runs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                drafter = build_drafter(kind, target, model=args.model)
            if drafter is not None:
                drafter.to(device=platform.device, dtype=dtype).eval()
            engine = Engine(target, drafter, tokenizer, args.k, max_model_len=512, max_batch_size=batch,
                            platform=platform, speculation=policy)
            selected = (prompts * batch)[: max(batch, args.num_prompts)]
            engine.generate(selected[:batch], params)                    # warm-up
            outs = engine.generate(selected, params)
            t = engine.timings
            stats = merge_stats([o.stats for o in outs])
            label = Path(kind).name if Path(kind).exists() else kind
            if drafter is not None and len(args.speculation) > 1:
                label = f"{label}/{policy}"
            rows.append({"drafter": label, "batch": batch, "k": args.k if drafter is not None else 0,
                         "speculation": engine.speculation, "depth_counts": engine.depth_counts,
                         "tokens": t.generated_tokens, "prefill_s": t.prefill_s, "decode_s": t.decode_s,
                         "decode_tok_s": t.decode_tokens_per_s, "tok_s": t.tokens_per_s,
                         "mean_accepted_length": stats.mean_accepted_length})
            print(f"batch {batch:3d} {label:18s} {t.decode_tokens_per_s:9.1f} tok/s  "
                  f"tau {stats.mean_accepted_length:.2f}  steps by depth {engine.depth_counts}", flush=True)
            del engine, drafter
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["drafter"] == "none")
        row["ratio_vs_plain"] = row["decode_tok_s"] / base["decode_tok_s"]
    return {"date": dt.date.today().isoformat(), "device": platform.describe(), "host": host.node(),
            "model": args.model, "dtype": str(dtype), "max_tokens": args.max_tokens, "rows": rows,
            "command": " ".join(sys.argv)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    drafters = list(dict.fromkeys(r["drafter"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(drafters)
    for i, d in enumerate(drafters):
        ys = [next(r["decode_tok_s"] for r in rows if r["drafter"] == d and r["batch"] == b) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], ys, width, label=d)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s")
    taus = ", ".join(f"{r['drafter']} {r['mean_accepted_length']:.2f}" for r in rows
                     if r["batch"] == batches[0] and r["drafter"] != "none")
    ax.set_title(f"{results['model']} on {results['device']}\nmean accepted length: {taus}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--drafters", nargs="+", default=["none", "eagle3", "dflash", "dspark"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("-k", type=int, default=7)
    parser.add_argument("--speculation", nargs="+", choices=["confidence", "fixed"], default=["confidence"],
                        help="the policies each drafter runs under (both: side by side)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, nargs=2, metavar=("RESULTS_JSON", "PNG"), default=None)
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot[0].read_text()), args.plot[1])
        return
    results = run(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
