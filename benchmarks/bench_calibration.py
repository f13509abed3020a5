"""The confidence head's calibration on held-out prompts, before and after the draft's fitted
temperatures (`ascend-dspark calibrate`), with a reliability diagram.

    python benchmarks/bench_calibration.py --drafter DIR --datasets gsm8k-test,mtbench --limit 24 \\
        --device cpu --dtype float32 --out benchmarks/results/scheduler/calibration.json

The draft runs with K drafts every step on the evaluation prompts (never the ones it was
calibrated on); every reached position gives (c_k, accepted). ECE / AUROC / Brier are
computed on the raw c_k and on sigmoid(logit(c_k) / T_k) (spec/calibration.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--datasets", default="gsm8k-test,mtbench")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from ascend_dspark.drafters import load_drafter
    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.engine.llm import DTYPES
    from ascend_dspark.models import load_target
    from ascend_dspark.platform import make_platform, set_platform
    from ascend_dspark.spec.calibration import read_temperatures, scale
    from ascend_dspark.training import metrics
    from ascend_dspark.training.evaluate import generate_dataset, prompt_ids
    from ascend_dspark.training.prompts import load_prompts

    temperatures = read_temperatures(args.drafter)
    if temperatures is None:
        raise SystemExit(f"{args.drafter} has no calibration.json: run `ascend-dspark calibrate` first")
    platform = set_platform(make_platform(args.device))
    dtype = DTYPES[args.dtype] if args.dtype else platform.default_dtype()
    target, tokenizer = load_target(args.model, dtype, platform.device)
    drafter = load_drafter(args.drafter, target).to(device=platform.device, dtype=dtype).eval()
    prompts = [p for s in args.datasets.split(",") for p in load_prompts(s, limit=args.limit)]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    engine = Engine(target, drafter, tokenizer, drafter.max_draft_tokens,
                    max_model_len=max(map(len, ids)) + args.max_new_tokens + 1, max_batch_size=args.batch_size,
                    platform=platform, speculation="fixed")
    with torch.inference_mode():
        outputs, _ = generate_dataset(engine, ids, args.temperature, args.max_new_tokens, args.batch_size)
    pairs = [pair for o in outputs for pair in metrics.conditional_pairs(o.stats)]
    raw = metrics.calibration_report(pairs)
    scaled = metrics.calibration_report([(k, scale(c, temperatures[k]), y) for k, c, y in pairs])
    result = {"date": dt.date.today().isoformat(), "device": platform.describe(), "drafter": args.drafter,
              "datasets": args.datasets, "prompts": len(prompts), "temperature": args.temperature,
              "temperatures": temperatures, "raw": raw, "scaled": scaled, "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, rep in (("raw", raw), ("scaled", scaled)):
        s = rep["summary"]
        print(f"{name:6s}: {s['count']} reached positions, ECE {s['ece']:.4f}, AUROC {s['auroc']:.3f}, "
              f"Brier {s['brier']:.4f}, mean c {s['mean_pred']:.3f} vs accepted {s['mean_label']:.3f}")
    plot(result, args.out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
    for name, color in (("raw", "#e8713c"), ("scaled", "#5b7fb5")):
        bins = result[name]["reliability"]
        ece = result[name]["summary"]["ece"]
        ax.plot([b["mean_pred"] for b in bins], [b["mean_label"] for b in bins], marker="o", color=color,
                label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence c_k")
    ax.set_ylabel("accepted, at reached positions")
    ax.set_title(f"confidence head on {result['datasets']}\n{result['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
