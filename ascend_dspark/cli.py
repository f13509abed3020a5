"""The `ascend-dspark` commands of this package: generate, doctor, regen, train, eval.

`serve` is added by serving/cli.py, which is the console script: the server sits above
this package, and nothing here imports it. `python -m ascend_dspark.cli` runs these
commands without the server (`torchrun -m ascend_dspark.cli train` needs nothing more).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import warnings
from collections.abc import Callable


def _generate(args: argparse.Namespace) -> int:
    from ascend_dspark.engine.llm import LLM
    from ascend_dspark.engine.outputs import merge_stats
    from ascend_dspark.spec.sampling import SamplingParams

    llm = LLM(model=args.model, drafter=args.drafter, num_speculative_tokens=args.num_speculative_tokens,
              device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, speculation=args.speculation,
              tensor_parallel_size=args.tensor_parallel_size, decode_steps_per_launch=args.decode_steps_per_launch)
    if not llm.is_driver:               # a tensor-parallel rank other than 0: it followed rank 0, done
        return 0
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_tokens=args.max_tokens)
    if args.raw:
        outputs = llm.generate([args.prompt], params)
    else:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params)
    out = outputs[0]
    stats = merge_stats([o.stats for o in outputs])
    t = llm.engine.timings
    llm.close()
    print(out.text)
    print(f"[{llm.platform.name}{f' TP={args.tensor_parallel_size}' if args.tensor_parallel_size > 1 else ''}] {t.generated_tokens} tokens in {t.prefill_s + t.decode_s:.2f} s | "
          f"{t.tokens_per_s:.1f} tokens/s ({t.decode_tokens_per_s:.1f} decode) | "
          f"mean accepted length {stats.mean_accepted_length:.2f} | drafter {args.drafter} "
          f"K={args.num_speculative_tokens if args.drafter != 'none' else 0} | finish {out.finish_reason}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """Diagnose this host (ascend_dspark/platform/diagnose.py): one `ok` / `warn` / `FAIL` / `--`
    line per check; `--selftest` also tests the platform's kernels and graphs
    (platform/selftest.py) and ends with a block for a bug report. Exit code 1 on a FAIL."""
    error = _torch_import_error()
    if error is not None:
        print(f"FAIL torch: `import torch` fails: {error}")
        print("     " + _explain_torch_failure(error))
        return 1
    from ascend_dspark.platform.diagnose import Check, diagnose

    report = diagnose()
    print("\n".join(report.lines()))
    print(f"detected: {report.platform.name if report.platform is not None else 'none'}")
    if args.selftest:
        print("\nself-test (one tiny call of every device kernel, one graph capture + update + replay):")
        if report.platform is None:
            report.checks.append(Check("selftest", "fail", "no platform to test"))
            print(report.checks[-1].line())
        else:
            from ascend_dspark.platform.selftest import run_selftest

            selftest = run_selftest(report.platform)
            checks = selftest.checks()
            print("\n".join(c.line() for c in checks))
            report.checks += checks
            graphs = f"eager ({selftest.graphs_eager})" if selftest.graphs_eager else selftest.graph.status
            report.versions["self-test"] = (f"{len(selftest.ops)} kernels, switched to the reference: "
                                            f"{', '.join(selftest.switched()) or 'none'}; graphs: {graphs}")
        _print_bug_report(report)
    return 1 if report.failed else 0


def _print_bug_report(report) -> None:
    from ascend_dspark import __version__

    print("\n---- paste this into a bug report ----")
    print(f"ascend-dspark {__version__}")
    for name, value in report.versions.items():
        print(f"{name}: {value}")
    if report.platform is not None:
        print(f"platform: {report.platform.describe()}")
    problems = [c.line() for c in report.checks if c.status in ("warn", "fail")]
    print("problems:" + ("".join(f"\n  {line}" for line in problems) if problems else " none"))
    print("---- end ----")


@functools.cache
def _torch_import_error() -> str | None:
    """None when torch imports, else its error. On an Ascend host torch imports torch_npu itself
    (device backend autoload), so a torch_npu without CANN breaks `import torch`: doctor must
    say so instead of dying with the traceback. Cached: a failed import is not retried."""
    try:
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (whatever it is, it is the diagnosis)
        return f"{type(exc).__name__}: {exc}"
    return None


def _explain_torch_failure(error: str) -> str:
    if "torch_npu" in error or ".so" in error or "Ascend" in error:
        return ("torch_npu is installed but CANN is not found (torch imports torch_npu automatically): "
                "`source /usr/local/Ascend/ascend-toolkit/set_env.sh` (or your install's set_env.sh); "
                "`TORCH_DEVICE_BACKEND_AUTOLOAD=0 ascend-dspark doctor` shows the rest of the diagnosis")
    return "reinstall torch (pip install torch) in this environment"


def build_parser(*more: Callable[[argparse._SubParsersAction], object]) -> argparse.ArgumentParser:
    """The parser of every command here; each of `more` adds one (after doctor) to the
    subparsers it is given, as serving/cli.py adds `serve`."""
    parser = argparse.ArgumentParser(prog="ascend-dspark", description="speculative decoding with DSpark drafters")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="speculative generation for one prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), an HF dir or a .gguf")
    gen.add_argument("--drafter", default="dspark", help="none | eagle3 | dflash | dspark | checkpoint dir")
    gen.add_argument("--num-speculative-tokens", "-k", type=int, default=7)
    gen.add_argument("--speculation", choices=["confidence", "fixed"], default=None,
                     help="each step's draft depth chosen for tokens/s (confidence, the default) or always K (fixed)")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--decode-steps-per-launch", type=int, default=None,
                     help="plain decode steps one launch may carry (default 1: each step its own launch; "
                          "4 pays where the host is slower than the device)")
    gen.add_argument("--device", default=None, help="cpu | cuda[:N] | npu[:N] (default: detect NPU > CUDA > CPU)")
    gen.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the device's)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                     help="shard the target over N ranks: run under `torchrun --nproc-per-node N` (README)")
    gen.set_defaults(func=_generate)
    doc = sub.add_parser("doctor", help="diagnose this host: devices, versions, ops, graphs (and why not)")
    doc.add_argument("--selftest", action="store_true",
                     help="also run one tiny call of every device kernel and one graph capture + replay; "
                          "prints a report to paste into a bug report")
    doc.set_defaults(func=_doctor)
    for add in more:
        add(sub)
    if _torch_import_error() is not None:
        return parser          # the training commands import torch at once; `doctor` says why it fails
    from ascend_dspark.training.calibrate import add_calibrate_parser
    from ascend_dspark.training.cli import add_train_parser
    from ascend_dspark.training.evaluate import add_eval_parser
    from ascend_dspark.training.regen import add_regen_parser

    add_regen_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m ascend_dspark.cli`: the commands of this package."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        print("error: `serve` is not part of ascend_dspark's own command line; run `ascend-dspark serve` "
              "(or `python -m serving.cli serve`)", file=sys.stderr)
        return 2
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` and run its command; an error the user can fix is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
