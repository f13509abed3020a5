"""Evaluate trained drafts the way DeepSpec does, on our engine.

Protocol (DeepSpec `deepspec/eval/base_evaluator.py`, DSpark paper §4.1):
- each prompt is its first user turn under the target's chat template;
- T = 0 is greedy; T > 0 is plain sampling (no top-k/top-p), sample i of a dataset seeded
  with `seed + i` (our sampling noise is a counter hash of (seed, position), so a sample
  does not depend on its batch or on the other drafters);
- the drafter proposes its full block every round (no confidence scheduling);
- one loaded target serves every drafter, so drafters are compared on the same target,
  prompts and seeds.

Metrics (see `metrics.py`): tau pooled over rounds with DeepSpec's EOS convention,
DeepSpec's unconditional accept_rate@k (0-based), our per-position conditional acceptance,
and for drafters with a confidence head ECE / AUROC / Brier of its survival and
conditional predictions.

Outputs: a report dict {"protocol", "config", "results": [one row per dataset x drafter x
temperature]}, written as DIR/eval.json (strict JSON: undefined values are null),
DIR/eval.md (a table) and PNG plots drawn from the JSON alone by `plots.py`.

    ascend-dspark eval --drafters dspark=ckpt/dspark,dflash=ckpt/dflash --datasets gsm8k-test,mtbench \\
        --limit 80 --temperatures 0,1 --max-new-tokens 256 --out results/eval
    # where the prompt packages / shared data are missing (a GPU machine): select elsewhere
    ascend-dspark eval --datasets gsm8k-test,humaneval,mtbench --limit 80 --prompts-out eval_prompts.jsonl
    ascend-dspark eval --prompts eval_prompts.jsonl --drafters ... --out results/eval
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ascend_dspark.engine.outputs import RequestOutput, merge_stats
from ascend_dspark.spec.sampling import SamplingParams

from . import bootstrap, metrics

PROTOCOL = ("DeepSpec: first user turn under the chat template; T=0 greedy, T>0 sampling seeded per sample "
            "(seed + index); full-block proposals; tau = committed tokens / rounds pooled over a dataset "
            "(an accepted EOS ends its round without a bonus); accept_rate@k 0-based, unconditional")
EVAL_DATASETS = ("gsm8k-test", "humaneval", "mtbench")


# -- generation -------------------------------------------------------------------------------
def prompt_ids(tokenizer, prompt) -> list[int]:
    """The prompt's messages (its first user turn) under the chat template."""
    return tokenizer.apply_chat_template(prompt.messages)


def generate_dataset(engine, ids: Sequence[list[int]], temperature: float, max_new_tokens: int,
                     batch_size: int = 1, seed: int = 0) -> tuple[list[RequestOutput], float]:
    """Generate for every prompt (sample i seeded with seed + i) in batches of `batch_size`.

    Returns the outputs and the wall-clock seconds the engine reported."""
    if batch_size > engine.max_batch_size:
        raise ValueError(f"batch_size {batch_size} > the engine's max_batch_size {engine.max_batch_size}")
    for i, p in enumerate(ids):
        if len(p) + max_new_tokens > engine.max_model_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens: with max_new_tokens={max_new_tokens} it needs "
                             f"max_model_len >= {len(p) + max_new_tokens}, the engine has {engine.max_model_len}")
    params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed + i)
              for i in range(len(ids))]
    outputs, seconds = [], 0.0
    for start in range(0, len(ids), batch_size):
        outputs += engine.generate(list(ids[start: start + batch_size]), params[start: start + batch_size])
        seconds += engine.timings.prefill_s + engine.timings.decode_s
    return outputs, seconds


def summarize(outputs: list[RequestOutput], seed: int = 0) -> dict:
    """Every metric of one (dataset, drafter, temperature) cell, with per-prompt committed
    tokens and rounds (DeepSpec's convention) and tau's bootstrap interval over prompts."""
    stats = merge_stats([o.stats for o in outputs])
    per_prompt = [metrics.rounds(o.stats) for o in outputs]
    committed = [sum(r.committed for r in rs) for rs in per_prompt]
    rounds_ = [len(rs) for rs in per_prompt]
    lo, hi = bootstrap.tau_interval(committed, rounds_, seed=seed)
    return {"num_samples": len(outputs), "rounds": stats.num_steps, "tau": metrics.tau(stats),
            "tau_ci": [lo, hi], "ci_level": bootstrap.LEVEL,
            "per_prompt": {"committed": committed, "rounds": rounds_},
            "verify_rate": metrics.verify_rate(stats), "draft_tokens_per_round": metrics.mean_proposal_length(stats),
            "accept_rate": metrics.accept_rates(stats), "conditional_acceptance": metrics.conditional_acceptance(stats),
            "output_tokens": sum(len(o.token_ids) for o in outputs), "calibration": metrics.calibration(stats)}


def evaluate(llm_or_engine, tokenizer=None, prompts: Iterable = (), temperatures: Sequence[float] = (0.0, 1.0),
             max_new_tokens: int = 256, batch_size: int = 1, seed: int = 0, drafter_name: str | None = None,
             on_row: Callable[[dict], None] | None = None) -> dict:
    """Evaluate one engine's drafter on prompts grouped by their `.source` (the dataset).

    `llm_or_engine`: an `LLM` or an `Engine` (with `speculation="fixed"` for DeepSpec's
    full-block protocol: the confidence policy verifies fewer); `tokenizer` defaults to theirs. Prompts are
    objects with `.source` and `.messages` (`training.prompts.Prompt`). Returns a report
    (see the module docstring); `on_row` sees each result row as soon as it is done."""
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    tokenizer = tokenizer or engine.tokenizer
    if tokenizer is None:
        raise ValueError("evaluate needs a tokenizer (the chat template)")
    name = drafter_name or getattr(engine.drafter, "kind", None) or "none"
    datasets: dict[str, list] = {}
    for p in prompts:
        datasets.setdefault(p.source, []).append(p)
    rows = []
    for dataset, group in datasets.items():
        ids = [prompt_ids(tokenizer, p) for p in group]
        for t in temperatures:
            outputs, seconds = generate_dataset(engine, ids, float(t), max_new_tokens, batch_size, seed)
            row = {"dataset": dataset, "drafter": name, "temperature": float(t),
                   "num_speculative_tokens": engine.num_speculative_tokens, **summarize(outputs, seed),
                   "elapsed_s": seconds}
            row["tokens_per_s"] = row["output_tokens"] / seconds if seconds else None
            rows.append(row)
            if on_row is not None:
                on_row(row)
    config = {"temperatures": [float(t) for t in temperatures], "max_new_tokens": max_new_tokens,
              "batch_size": batch_size, "seed": seed, "datasets": list(datasets)}
    return {"protocol": PROTOCOL, "config": config, "results": rows}


def evaluate_drafters(target, tokenizer, drafters: dict[str, object], prompts: Sequence, *,
                      temperatures: Sequence[float] = (0.0, 1.0), max_new_tokens: int = 256, batch_size: int = 1,
                      seed: int = 0, num_speculative_tokens: int | None = None, platform=None,
                      on_row: Callable[[dict], None] | None = None, graph_buckets: list[int] | None = None) -> dict:
    """Every drafter (name -> drafter on the target's device, or None for plain decoding) on
    one loaded target; one report with all rows. K defaults to each drafter's own block."""
    from ascend_dspark.engine.engine import Engine

    longest = max(len(prompt_ids(tokenizer, p)) for p in prompts)
    buckets = sorted(b for b in graph_buckets or () if b <= batch_size) or None     # None: the engine's own
    report: dict = {}
    for name, drafter in drafters.items():
        k = num_speculative_tokens or (drafter.max_draft_tokens if drafter is not None else 1)
        engine = Engine(target, drafter, tokenizer, k, max_model_len=longest + max_new_tokens + 1,
                        max_batch_size=batch_size, platform=platform, graph_buckets=buckets,
                        speculation="fixed")              # the protocol: full-block proposals
        part = evaluate(engine, tokenizer, prompts, temperatures, max_new_tokens, batch_size, seed, name, on_row)
        report = part if not report else {**report, "results": report["results"] + part["results"]}
        del engine
    return report


def tau_ratios(report: dict, pairs: Sequence[tuple[str, str]], seed: int = 0) -> list[dict]:
    """tau(a) / tau(b) with its paired bootstrap interval, for every (a, b) in `pairs` and
    every (dataset, temperature) both were evaluated on (same prompts, same seeds)."""
    cells = {(r["dataset"], r["temperature"], r["drafter"]): r for r in report["results"]}
    out = []
    for a, b in pairs:
        for (dataset, t, name), ra in cells.items():
            rb = cells.get((dataset, t, b))
            if name != a or rb is None:
                continue
            pa, pb = ra["per_prompt"], rb["per_prompt"]
            r = bootstrap.ratio_interval((pa["committed"], pa["rounds"]), (pb["committed"], pb["rounds"]), seed=seed)
            out.append({"dataset": dataset, "temperature": t, "numerator": a, "denominator": b, **r})
    return out


def merge_reports(reports: Sequence[dict]) -> dict:
    """One report from several runs of `eval` over the same prompts and settings (e.g. the
    shipped drafts evaluated while the new ones trained): their rows together."""
    if not reports:
        raise ValueError("nothing to merge")
    keys = ("temperatures", "max_new_tokens", "seed", "datasets")
    first = reports[0]["config"]
    for r in reports[1:]:
        diff = [k for k in keys if r["config"].get(k) != first.get(k)]
        if diff:
            raise ValueError(f"reports differ in {', '.join(diff)}: not the same evaluation")
    cells = [(row["dataset"], row["temperature"], row["drafter"]) for r in reports for row in r["results"]]
    if len(set(cells)) != len(cells):
        raise ValueError("the same drafter appears in two reports")
    drafters = {}
    for r in reports:
        drafters.update(r["config"].get("drafters") or {})
    return {**reports[0], "config": {**first, "drafters": drafters},
            "results": [row for r in reports for row in r["results"]]}


def parse_ratios(text: str | None) -> list[tuple[str, str]]:
    """"dspark/dflash,new/old" -> [("dspark", "dflash"), ("new", "old")]."""
    pairs = []
    for item in (s.strip() for s in (text or "").split(",") if s.strip()):
        a, sep, b = item.partition("/")
        if not sep or not a.strip() or not b.strip():
            raise ValueError(f"--ratios item {item!r}: expected NAME/NAME")
        pairs.append((a.strip(), b.strip()))
    return pairs


# -- writing --------------------------------------------------------------------------------------
def to_json(report: dict) -> str:
    """Strict JSON: NaN / inf (undefined metrics) become null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(report), indent=1, allow_nan=False)


def markdown_table(report: dict) -> str:
    """dataset x drafter x temperature: tau, accept_rate@k, and calibration where there is one."""
    rows = report["results"]
    width = max((len(r["accept_rate"]) for r in rows), default=0)
    head = (["dataset", "drafter", "T", "samples", "tau", "tau 95% CI"] + [f"acc@{k}" for k in range(width)]
            + ["ECE", "AUROC", "Brier", "ECE(c_k)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = [_fmt(a, 3) for a in r["accept_rate"]] + ["-"] * (width - len(r["accept_rate"]))
        cal = r.get("calibration")
        survival = cal["survival"]["summary"] if cal else {}
        conditional = cal["conditional"]["summary"] if cal else {}
        ci = r.get("tau_ci") or [None, None]
        cells = ([r["dataset"], r["drafter"], f"{r['temperature']:g}", str(r["num_samples"]), _fmt(r["tau"], 2),
                  f"[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]"]
                 + acc + [_fmt(survival.get("ece"), 3), _fmt(survival.get("auroc"), 3),
                          _fmt(survival.get("brier"), 3), _fmt(conditional.get("ece"), 3)])
        lines.append("| " + " | ".join(cells) + " |")
    ratios = report.get("ratios") or []
    if ratios:
        lines += ["", "| dataset | T | ratio | tau ratio | 95% CI | P(ratio <= 1) |", "|---|---|---|---:|---|---:|"]
        lines += [f"| {q['dataset']} | {q['temperature']:g} | {q['numerator']} / {q['denominator']} | "
                  f"{_fmt(q['ratio'], 3)} | [{_fmt(q['lo'], 3)}, {_fmt(q['hi'], 3)}] | {_fmt(q['p_le_1'], 3)} |"
                  for q in ratios]
    note = ("tau 95% CI: percentile bootstrap over prompts (2000 replicates; ratios paired on the same prompts). "
            "tau: mean committed tokens per round incl. the bonus, pooled over rounds (DeepSpec). "
            "acc@k: DeepSpec's accept_rate@k, 0-based (acc@0 = first draft), unconditional. "
            "ECE (20 bins) / AUROC / Brier: confidence head, prefix-survival view (DeepSpec); "
            "ECE(c_k): each c_k against its own acceptance at reached positions.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def _fmt(x, digits: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """DIR/eval.json, DIR/eval.md and the plots (skipped, with one warning, without matplotlib)."""
    from .plots import write_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(to_json(report))
    (out / "eval.md").write_text(markdown_table(report))
    return [out / "eval.json", out / "eval.md", *write_plots(json.loads((out / "eval.json").read_text()), out)]


# -- command line -------------------------------------------------------------------------------
def parse_drafters(text: str) -> dict[str, str]:
    """"dspark=PATH,dflash=PATH" -> {"dspark": PATH, ...}; a bare entry names itself."""
    out = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, spec = item.partition("=")
        name, spec = name.strip(), (spec.strip() or name.strip())
        if name in out:
            raise ValueError(f"drafter name {name!r} given twice")
        out[name] = spec
    if not out:
        raise ValueError("--drafters is empty")
    return out


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """`ascend-dspark eval ...`: register on the CLI's subparsers (sets func=run_eval)."""
    p = subparsers.add_parser("eval", help="evaluate drafters (tau, accept_rate@k, calibration) DeepSpec's way")
    p.add_argument("--model", default="default", help="target: 'default', an HF dir or a .gguf")
    p.add_argument("--drafters", default=None,
                   help="comma list of NAME=PATH (a checkpoint dir) or kinds: dspark=ckpt/a,dflash=ckpt/b,eagle3=...")
    p.add_argument("--datasets", default=",".join(EVAL_DATASETS), help=f"comma list of {', '.join(EVAL_DATASETS)}")
    p.add_argument("--limit", type=int, default=None, help="prompts per dataset (a seeded subset; default: all)")
    p.add_argument("--prompts", default=None,
                   help="read the prompts from this JSONL (written by --prompts-out) instead of --datasets/--limit")
    p.add_argument("--prompts-out", default=None,
                   help="only write the selected prompts here and exit, no model loaded (select on a machine with "
                        "the prompt packages and shared data, evaluate on one without)")
    p.add_argument("--temperatures", default="0,1", help="comma list (0 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=None,
                   help="drafts per round (default: each drafter's own block size)")
    p.add_argument("--seed", type=int, default=0, help="dataset subset and per-sample sampling seeds")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] | npu[:N] (default: detect)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the device's)")
    p.add_argument("--out", default=None, help="directory for eval.json, eval.md and the plots")
    p.add_argument("--graph-buckets", default=None,
                   help="comma list of decode batch sizes captured as graphs (default: the engine's powers of two)")
    p.add_argument("--merge", default=None, metavar="JSON,JSON",
                   help="no generation: merge these eval.json reports (same prompts and settings) into --out, "
                        "with --ratios across them")
    p.add_argument("--ratios", default=None, metavar="A/B,...",
                   help="tau ratios with paired bootstrap intervals between the named drafters, e.g. dspark/dflash")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> int:
    """Body of `ascend-dspark eval`: load the target once, then each drafter in turn."""
    from ascend_dspark.engine.llm import DTYPES, build_drafter
    from ascend_dspark.models import load_target
    from ascend_dspark.platform import make_platform, set_platform

    from .prompts import load_prompts, read_prompts, save_prompts

    if args.merge:
        if not args.out:
            raise ValueError("--merge needs --out")
        report = merge_reports([json.loads(Path(p).read_text()) for p in args.merge.split(",") if p.strip()])
        pairs = parse_ratios(args.ratios)
        names = {row["drafter"] for row in report["results"]}
        unknown = sorted({n for pair in pairs for n in pair} - names)
        if unknown:
            raise ValueError(f"--ratios names {', '.join(unknown)}, not among the merged drafters {', '.join(sorted(names))}")
        report["ratios"] = tau_ratios(report, pairs, seed=report["config"].get("seed", 0))
        paths = write_report(report, args.out)
        print(markdown_table(report))
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    if args.prompts:
        prompts = read_prompts(args.prompts)
    else:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        prompts = [p for d in datasets for p in load_prompts(d, args.limit, seed=args.seed)]
    if args.prompts_out:
        save_prompts(prompts, args.prompts_out)
        print(f"wrote {len(prompts)} prompts to {args.prompts_out}")
        return 0
    if not args.drafters or not args.out:
        raise ValueError("eval needs --drafters and --out (or --prompts-out to only write the prompts)")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    specs = parse_drafters(args.drafters)
    pairs = parse_ratios(args.ratios)
    unknown = sorted({n for pair in pairs for n in pair} - set(specs))
    if unknown:
        raise ValueError(f"--ratios names {', '.join(unknown)}, not among --drafters {', '.join(specs)}")
    temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {args.dtype!r}: expected one of {', '.join(DTYPES)}")
    platform = set_platform(make_platform(args.device))
    dtype = DTYPES[args.dtype] if args.dtype else platform.default_dtype()
    target, tokenizer = load_target(args.model, dtype, platform.device)

    def show(row: dict) -> None:
        acc = " ".join(_fmt(a, 2) for a in row["accept_rate"])
        print(f"{row['drafter']:>10s} {row['dataset']:>12s} T={row['temperature']:g}: tau {_fmt(row['tau'], 2)} | "
              f"accept_rate@k {acc} | {row['num_samples']} samples, {row['elapsed_s']:.1f} s", flush=True)

    started = time.perf_counter()
    report = None
    for name, spec in specs.items():           # one drafter on the device at a time
        drafter = build_drafter(spec, target, seed=args.seed, model=args.model)
        if drafter is not None:
            drafter.to(device=platform.device, dtype=dtype).eval()
        part = evaluate_drafters(target, tokenizer, {name: drafter}, prompts, temperatures=temperatures,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                 num_speculative_tokens=args.num_speculative_tokens, platform=platform, on_row=show,
                                 graph_buckets=[int(b) for b in args.graph_buckets.split(",")] if args.graph_buckets
                                 else None)
        report = part if report is None else {**report, "results": report["results"] + part["results"]}
        del drafter
        platform.empty_cache()
    report["config"].update(model=str(args.model), drafters=specs, limit=args.limit,
                            device=platform.describe(), dtype=str(dtype).removeprefix("torch."),
                            num_speculative_tokens=args.num_speculative_tokens,
                            elapsed_s=time.perf_counter() - started)
    report["ratios"] = tau_ratios(report, pairs, seed=args.seed)
    paths = write_report(report, args.out)
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main_eval(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m ascend_dspark.training.evaluate --drafters ... --out DIR`."""
    parser = argparse.ArgumentParser(prog="ascend-dspark")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    import logging
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main_eval(sys.argv[1:]))
