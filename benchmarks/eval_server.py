"""GSM8K through lm-eval against the server, beside the same documents through transformers
in-process: accuracy, response tokens/s, and whether the greedy answers agree.

    python benchmarks/eval_server.py --num-docs 20 [--max-gen-toks 256] [--out eval.json] \\
        [-- SERVER FLAGS, e.g. --speculation fixed --dtype float32]
    make eval-server EVAL_ARGS="--num-docs 20"

1. server   `ascend-dspark serve` (the default model and its DSpark draft unless the server
            flags say otherwise) on a free loopback port, then lm-eval's `local-completions`
            (its remote tokenizer: /tokenizer_info, /tokenize) on a zero-shot GSM8K task over
            the first `--num-docs` documents of the test split that ships in the package
            (benchmarks/lm_eval_tasks.py: no dataset hub), greedy.
2. transformers  the same task through lm-eval's `hf` model, handed transformers' own
            model read from the same GGUF file, in this process with the same torch threads.

Both are scored by lm-eval (exact match of the "#### N" answer: strict-match; of the last
number: flexible-extract). Tokens/s: tokens of the responses (re-tokenized, cut at the stop
strings as lm-eval cuts them) over the wall time of lm-eval's evaluation (start-up excluded),
so both sides count the same tokens. At temperature 0 in float32 the responses should be
identical; the report counts those that are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform as host
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_eval_tasks  # noqa: E402
import serve_bench  # noqa: E402

TASK = "gsm8k_shipped"
METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def responses(result: dict) -> dict[int, str]:
    """doc id -> the model's raw response (each doc is logged once per filter)."""
    return {s["doc_id"]: s["resps"][0][0] for s in result["samples"][TASK]}


def timed(fn) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def through_server(args, server_args: list[str], work: Path) -> tuple[dict, float]:
    env_threads = {"OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)              # the launched server inherits it
    proc, url = serve_bench.launch(["--served-model-name", "eval", "--max-model-len", str(args.max_model_len),
                                    *server_args], work / "server.log", timeout=600)
    try:
        task = lm_eval_tasks.gsm8k_generate(work, args.num_docs, args.max_gen_toks, args.offset)
        return timed(lambda: lm_eval_tasks.run([task], "local-completions", {
            "base_url": url + "/v1/completions", "model": "eval", "num_concurrent": 1, "max_retries": 1,
            "max_length": args.max_model_len, "timeout": 3600}))
    finally:
        serve_bench.stop(proc)


def through_transformers(args, work: Path) -> tuple[dict, float, object]:
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ascend_dspark.models.loader import default_gguf

    torch.set_num_threads(args.threads)
    path = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=args.max_model_len)
    task = lm_eval_tasks.gsm8k_generate(work, args.num_docs, args.max_gen_toks, args.offset)
    result, seconds = timed(lambda: lm_eval_tasks.run([task], lm, {}))
    return result, seconds, tokenizer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-docs", type=int, default=20)
    p.add_argument("--offset", type=int, default=0, help="skip this many documents of the test split first")
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on both sides (on a shared CPU more than one can make every step "
                        "many times slower: OpenMP threads spin waiting for each other)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import lm_eval.evaluator  # noqa: F401  (imported before either side is timed: it takes seconds)
    import lm_eval.models.openai_completions  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="eval-server-"))
    served, served_s = through_server(args, server_args, work)
    rows = {"server": (served, served_s)}
    tokenizer = None
    if not args.skip_transformers:
        hf, hf_s, tokenizer = through_transformers(args, work)
        rows["transformers"] = (hf, hf_s)
    if tokenizer is None:
        from transformers import AutoTokenizer

        from ascend_dspark.models.loader import default_gguf

        path = default_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": serve_bench.machine(), "python": host.python_version(),
              "command": " ".join(["python", "benchmarks/eval_server.py", *sys.argv[1:]]),
              "commit": _commit(), "num_docs": args.num_docs, "max_gen_toks": args.max_gen_toks,
              "threads": args.threads, "server_args": server_args, "results": {}}
    for name, (result, seconds) in rows.items():
        texts = responses(result)
        tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts.values())
        metrics = result["results"][TASK]
        report["results"][name] = {**{m: float(metrics[m]) for m in METRICS}, "seconds": round(seconds, 2),
                                   "response_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}
    if "transformers" in rows:
        a, b = responses(served), responses(rows["transformers"][0])
        same = [i for i in a if a[i] == b.get(i)]
        report["identical_responses"] = f"{len(same)}/{len(a)}"
        report["differing_docs"] = sorted(set(a) - set(same))
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
