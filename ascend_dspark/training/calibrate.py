"""`ascend-dspark calibrate`: fit the confidence head's per-position temperatures on held-in
prompts and store them with the draft (spec/calibration.py says what they are).

    ascend-dspark calibrate --drafter ascend_dspark/drafts/smollm2-135m-instruct/dspark \\
        --datasets gsm8k-train,sharegpt,code --limit 64 --max-new-tokens 128

The draft runs with K drafts every step (the fixed policy, so every position is proposed),
at the temperature asked (0 by default); the (c_k, accepted) pairs of the reached positions
give T_1..T_K; ECE before and after is printed per position and written beside the
temperatures in `calibration.json`. The default prompt sets are the training ones, never the
evaluation sets.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a DSpark draft's confidence temperatures on held-in prompts")
    p.add_argument("--drafter", required=True, help="the draft directory (calibration.json is written into it)")
    p.add_argument("--model", default="default")
    p.add_argument("--datasets", default="gsm8k-train,sharegpt,code",
                   help="comma-separated training prompt sets (never the evaluation sets)")
    p.add_argument("--limit", type=int, default=64, help="prompts per set (a seeded random subset)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="the sampling temperature to calibrate for")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from ascend_dspark.drafters import load_drafter
    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.engine.llm import DTYPES
    from ascend_dspark.models import load_target
    from ascend_dspark.platform import make_platform, set_platform
    from ascend_dspark.spec.calibration import fit_per_position, scale, write_temperatures

    from . import metrics
    from .evaluate import generate_dataset, prompt_ids
    from .prompts import EVAL_SETS, load_prompts

    sets = [s for s in args.datasets.split(",") if s]
    if set(sets) & set(EVAL_SETS):
        raise ValueError(f"calibrate on held-in prompts, not the evaluation sets {sorted(set(sets) & set(EVAL_SETS))}")
    platform = set_platform(make_platform(args.device))
    dtype = DTYPES[args.dtype] if args.dtype else platform.default_dtype()
    target, tokenizer = load_target(args.model, dtype, platform.device)
    drafter = load_drafter(args.drafter, target).to(device=platform.device, dtype=dtype).eval()
    if not getattr(drafter.config, "confidence_head", False):
        raise ValueError(f"{args.drafter}: this draft has no confidence head: nothing to calibrate")
    prompts = [p for s in sets for p in load_prompts(s, limit=args.limit, seed=args.seed)]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    k = drafter.max_draft_tokens
    engine = Engine(target, drafter, tokenizer, k, max_model_len=max(map(len, ids)) + args.max_new_tokens + 1,
                    max_batch_size=args.batch_size, platform=platform, speculation="fixed")
    with torch.inference_mode():
        outputs, _ = generate_dataset(engine, ids, args.temperature, args.max_new_tokens, args.batch_size, args.seed)
    pairs = [pair for o in outputs for pair in metrics.conditional_pairs(o.stats)]
    temperatures = fit_per_position(pairs, k)
    before = metrics.calibration_report(pairs)
    after = metrics.calibration_report([(pos, scale(c, temperatures[pos]), y) for pos, c, y in pairs])
    for b, a, t in zip(before["per_position"], after["per_position"], temperatures):
        print(f"position {b['position'] + 1}: {b['count']:6d} reached, T = {t:.3f}, ECE {b['ece']:.4f} -> {a['ece']:.4f}")
    report = {"fitted_on": {"datasets": sets, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                            "temperature": args.temperature, "model": args.model, "pairs": len(pairs)},
              "ece_before": before["summary"]["ece"], "ece_after": after["summary"]["ece"],
              "brier_before": before["summary"]["brier"], "brier_after": after["summary"]["brier"]}
    path = write_temperatures(Path(args.drafter), temperatures, report)
    print(f"ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}, Brier {report['brier_before']:.4f} -> "
          f"{report['brier_after']:.4f}; wrote {path}")
    return 0
