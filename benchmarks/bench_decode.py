"""Batch-1 greedy plain decoding, side by side in one process: our engine with whole-step
graph replay (with the platform's default overlap of host bookkeeping and device work, and
without it), our engine eager, each with one step per launch and with `--steps-per-launch`
plain steps per launch (engine/multistep.py; 1 leaves those rows out), and transformers'
`generate` (dynamic cache, and a static cache with the forward compiled in
"reduce-overhead" mode, i.e. CUDA graphs).

    python benchmarks/bench_decode.py --model smollm2-random --max-tokens 128 --out decode.json
    python benchmarks/bench_decode.py --model default --speculative --out decode_spec.json   # + the shipped DSpark
    python benchmarks/bench_decode.py --device cpu --dtype float32 --max-tokens 9 --no-compile   # CPU smoke

`--speculative` (with `--model default`) adds our engine (graphs where the device has them) with the shipped DSpark draft
under the confidence policy and under fixed K = 7, on a real prompt (the first GSM8K test
question, chat-templated; every configuration decodes it): the scheduler against plain decoding
with graphs against transformers static + compile, in one process (BENCHMARKS.md, issue 18).
The tokens of every engine configuration must agree (greedy speculation is lossless):
`ours_graphs_equal_eager` in the JSON.

`--model default` loads the embedded SmolLM2 GGUF; `smollm2-random` builds the same
architecture (SmolLM2-135M's config) with random weights, which decodes at the same speed
(ignore_eos: every configuration generates exactly max_tokens). Each configuration gets a
warm-up run first; tokens/s counts generated tokens over the generate call's wall time
(prefill included, as a user sees it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, hidden_act="silu")
PROMPT = list(range(100, 132))


def gsm8k_prompt(tokenizer) -> list[int]:
    """The first GSM8K test question (the prompts ship with the package), chat-templated."""
    from ascend_dspark.training.prompts import load_prompts

    return tokenizer.apply_chat_template(list(load_prompts("gsm8k-test")[0].messages))


def load(model: str, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ascend_dspark.models import load_target
    from ascend_dspark.models.config import ModelConfig
    from ascend_dspark.models.decoder import DecoderModel

    if model == "default":
        ours, tokenizer = load_target("default", dtype, device)
        hf = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device, dtype).eval()
        hf.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("inv_freq")}, strict=False)
        return ours, hf, tokenizer
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device, dtype).eval()
    ours = DecoderModel(ModelConfig.from_dict(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=False)
    return ours.to(device, dtype).eval().requires_grad_(False), hf, None


def timed(fn, sync) -> float:
    fn()                                       # warm-up (and graph capture / compilation)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run(args) -> dict:
    import torch

    from ascend_dspark.engine.engine import Engine
    from ascend_dspark.platform import make_platform
    from ascend_dspark.spec.sampling import SamplingParams

    platform = make_platform(args.device)
    dtype = getattr(torch, args.dtype)
    ours, hf, tokenizer = load(args.model, dtype, platform.device)
    if args.speculative and tokenizer is None:
        raise SystemExit("--speculative needs --model default (the shipped drafts are trained for it)")
    prompt = gsm8k_prompt(tokenizer) if args.speculative else PROMPT
    n = args.max_tokens
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    results, outputs, taus = {}, {}, {}
    configs = []            # (name, graphs, overlap, steps per launch, drafter, speculation policy)
    for name, graphs, overlap in (("ours, graphs", True, None), ("ours, graphs, no overlap", True, False),
                                  ("ours, eager", False, None)):
        configs.append((name, graphs, overlap, 1, None, None))
        if args.steps_per_launch > 1:
            configs.append((f"{name}, {args.steps_per_launch} steps/launch", graphs, overlap, args.steps_per_launch,
                            None, None))
    if args.speculative:
        from ascend_dspark.engine.llm import build_drafter

        for policy in ("confidence", "fixed"):      # a drafter per engine: its caches are the engine's
            drafter = build_drafter("dspark", ours, model="default").to(device=platform.device, dtype=dtype).eval()
            configs.append((f"ours, DSpark {policy}", None, None, 1, drafter, policy))   # graphs where there are
    for name, graphs, overlap, per_launch, drafter, policy in configs:
        if graphs and not platform.supports_graphs:
            continue
        engine = Engine(ours, drafter, max_model_len=1024, max_batch_size=1, platform=platform, graphs=graphs,
                        overlap=overlap, decode_steps_per_launch=per_launch, speculation=policy)

        def run_ours(engine=engine, name=name):
            out = engine.generate([prompt], params)[0]
            outputs[name], taus[name] = out.token_ids, out.stats.mean_accepted_length

        secs = timed(run_ours, platform.synchronize)
        results[name] = n / secs
        print(f"{name:34s} {n / secs:8.1f} tok/s" + (f", tau {taus[name]:.2f}" if drafter is not None else ""),
              flush=True)
    ids = torch.tensor([prompt], device=platform.device)
    gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        secs = timed(lambda: hf.generate(ids, **gen), platform.synchronize)
        results["transformers generate, dynamic cache"] = n / secs
        print(f"{'transformers, dynamic cache':34s} {n / secs:8.1f} tok/s", flush=True)
        if platform.supports_graphs and not args.no_compile:
            # transformers compiles the forward itself for a static cache ("reduce-overhead":
            # CUDA graphs) inside generate; the first calls compile and capture.
            def compiled():
                return hf.generate(ids, cache_implementation="static", **gen)

            timed(compiled, platform.synchronize)
            secs = timed(compiled, platform.synchronize)
            results["transformers generate, static cache + compile"] = n / secs
            print(f"{'transformers, static + compile':34s} {n / secs:8.1f} tok/s", flush=True)
    same = len({tuple(v) for v in outputs.values()}) <= 1
    return {"date": dt.date.today().isoformat(), "device": platform.describe() if hasattr(platform, "describe") else args.device,
            "model": args.model, "dtype": args.dtype, "max_tokens": n, "prompt_tokens": len(prompt),
            "steps_per_launch": args.steps_per_launch, "tokens_per_s": results,
            "tau": {k: v for k, v in taus.items() if "DSpark" in k}, "ours_graphs_equal_eager": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-random", choices=["default", "smollm2-random"])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--steps-per-launch", type=int, default=4,
                   help="rows of ours with this many plain decode steps per launch too (1: none)")
    p.add_argument("--speculative", action="store_true",
                   help="with --model default: also the shipped DSpark draft under the confidence and fixed policies")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    res = run(args)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
