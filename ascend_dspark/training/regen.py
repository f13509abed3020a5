"""Regenerate training responses with the target itself (DeepSpec's data recipe).

A draft learns to predict *its target's* continuations, so the responses in the training
set are sampled from the target under its chat template, with the target's recommended
sampling parameters (DeepSpec: T=0.7, top-p 0.8, top-k 20, thinking off), through our own
batched engine in plain decoding (no drafter).

Output is an append-only JSONL file, one record per (prompt, sample):

    {"id", "prompt_id", "sample", "source", "prompt", "temperature", "seed", "prompt_ids", "response_ids",
     "finish_reason"[, "response"]}

Several samples per prompt (`samples_per_prompt` = n > 1) grow the data past the prompt
sets' size: record k of prompt P has id `P#k`; sample 0 is greedy (the target's T=0
answer, what a draft must match at T=0) and samples 1..n-1 are drawn at the regeneration
temperature, each with its own seed, a hash of (run seed, `P#k`). With n = 1 the record
id is the prompt id and its one sample is drawn at the temperature (the earlier format).

`prompt_ids` is the chat-templated prompt (ending with the assistant header; thinking off);
`response_ids` are the sampled tokens, ending with the end-of-turn token when
finish_reason is "stop" (the draft must learn to predict it too).

Runs are resumable and reproducible: ids already in the file are skipped, a half-written
last line (a killed run) is cut off with a warning, and each prompt's sampling seed is
derived from its id (the sampling noise is a counter hash of (seed, position), independent
of the batch). Chunks are cut from the prompt list, not from what is left to do, so a run
stopped by its time budget resumes into exactly the batches the uninterrupted run forms,
and a killed run differs only in the chunk it was killed in. Records are then identical
wherever the forward pass is deterministic (the CPU), and a sample's tokens depend only on
(prompt, sample seed), not on which other samples or prompts share its batch. On an H200 in bf16 they are not
bit-reproducible: the cuDNN SDPA backend is not run-to-run deterministic (the same batch
of 256 twice: 168 identical responses; 256 with that backend disabled), and other batch
shapes round differently. Either way every record is an exact sample of the target.
Prompts whose normalised text was already seen (in this call or in the file, under another
prompt id) are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ascend_dspark.spec.sampling import SamplingParams

from .prompts import TRAIN_SETS, Prompt, normalize, read_prompts, save_prompts, training_mix

logger = logging.getLogger(__name__)

# DeepSpec's regeneration defaults (scripts/data/README.md, Qwen3).
TEMPERATURE, TOP_P, TOP_K = 0.7, 0.8, 20


@dataclass
class RegenStats:
    prompts: int = 0             # prompts given
    existing: int = 0            # skipped: id already in the file
    duplicates: int = 0          # skipped: same normalised text as an earlier prompt / record
    too_long: int = 0            # skipped: chat-templated prompt longer than max_prompt_tokens
    written: int = 0             # records appended by this call
    generated_tokens: int = 0
    elapsed_s: float = 0.0
    stopped_early: bool = False  # the time budget ended the run before every prompt was done

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat-templated prompt, thinking disabled: Qwen3's template reads `enable_thinking`
    (DeepSpec regenerates in non-thinking mode); templates without it ignore the flag."""
    text = tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                            enable_thinking=False)
    return tokenizer.encode(text, add_special_tokens=False)     # what tokenize=True does


def prompt_seed(prompt_id: str, seed: int = 0) -> int:
    """The sampling seed of one prompt: a hash of (run seed, prompt id), in [0, 2**63)."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """The records of a regeneration file (missing file: none).

    A last line without its newline is what a killed run leaves behind (each record is
    written as one "...\\n" string): it is dropped with a warning, and cut off the file when
    `repair` so appending can continue. A complete line that does not parse is corruption:
    ValueError naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1                  # bytes of complete lines
    if end < len(data):
        logger.warning("%s: dropping a truncated last line (%d bytes) left by an interrupted run",
                       path, len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
    records = []
    for i, line in enumerate(data[:end].split(b"\n")[:-1]):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({exc})") from None
    return records


def sample_id(prompt_id: str, sample: int, samples_per_prompt: int) -> str:
    """The record id of sample `sample` of a prompt: the prompt id itself when there is one
    sample per prompt, `<prompt id>#<sample>` otherwise."""
    return prompt_id if samples_per_prompt == 1 else f"{prompt_id}#{sample}"


def regenerate(engine, tokenizer, prompts: list[Prompt], out_path: str | Path, *,
               temperature: float = TEMPERATURE, top_p: float = TOP_P, top_k: int = TOP_K,
               min_p: float = 0.0, max_new_tokens: int = 384, seed: int = 0, samples_per_prompt: int = 1,
               chunk_size: int | None = None, max_prompt_tokens: int | None = None,
               time_budget_s: float | None = None, with_text: bool = True,
               progress: bool = True) -> RegenStats:
    """Sample the target's response to each prompt and append the records to `out_path`.

    `engine`: an `Engine` over the target with no drafter; its `max_batch_size` rows run
    together. `chunk_size` (default: the engine's batch size) prompts are tokenised, sorted
    by length, generated and appended (fsync'd) at a time. `max_prompt_tokens` (default
    max_model_len - max_new_tokens) skips longer prompts rather than truncate a chat
    template. `time_budget_s` stops before a chunk that would likely overrun the budget
    (estimated from the slowest chunk so far; the first chunk of a call always runs).
    `samples_per_prompt`: records per prompt (see the module docstring); a chunk counts
    requests, and the samples of a prompt are neighbours in it.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if engine.drafter is not None:
        raise ValueError("regeneration samples the target itself: build the Engine with drafter=None")
    limit = engine.max_model_len - max_new_tokens if max_prompt_tokens is None else max_prompt_tokens
    if limit < 1 or limit + max_new_tokens > engine.max_model_len:
        raise ValueError(f"max_prompt_tokens ({limit}) + max_new_tokens ({max_new_tokens}) must fit the "
                         f"engine's max_model_len ({engine.max_model_len}): build the engine with a larger one")
    chunk_size = chunk_size or engine.max_batch_size
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_records(out_path, repair=True)
    done_ids = {r["id"] for r in existing}
    file_keys = {normalize(r["prompt"]): r.get("prompt_id") or r["id"] for r in existing if "prompt" in r}

    # Chunks are cut from the deduplicated prompt list itself, *before* looking at the file,
    # so a run stopped at a chunk boundary resumes with exactly the batches the
    # uninterrupted run would have formed.
    stats = RegenStats(prompts=len(prompts))
    unique, seen = [], set()
    for p in prompts:
        key = normalize(p.text)
        if key in seen:
            stats.duplicates += 1
        else:
            seen.add(key)
            unique.append(p)
    n = samples_per_prompt
    requests = []                                          # (prompt, sample index, record id)
    for p in unique:
        if file_keys.get(normalize(p.text), p.id) != p.id:
            stats.duplicates += 1                         # the file has this text under another id
            continue
        for k in range(n):
            rid = sample_id(p.id, k, n)
            if rid in done_ids:
                stats.existing += 1
            else:
                requests.append((p, k, rid))
    pending_ids = {rid for _, _, rid in requests}
    every = [(p, k, sample_id(p.id, k, n)) for p in unique for k in range(n)]
    chunks = [c for i in range(0, len(every), chunk_size)
              if (c := [r for r in every[i:i + chunk_size] if r[2] in pending_ids])]

    t0 = time.perf_counter()
    slowest = 0.0
    bar = tqdm(total=len(requests), desc="regen", unit="resp", disable=not progress)
    with open(out_path, "a", encoding="utf-8") as out:
        for c, chunk in enumerate(chunks):
            elapsed = time.perf_counter() - t0
            if time_budget_s is not None and c > 0 and elapsed + slowest > time_budget_s:
                stats.stopped_early = True
                break
            t_chunk = time.perf_counter()
            by_prompt: dict[str, list[int]] = {}
            for p, _, _ in chunk:
                if p.id not in by_prompt:
                    by_prompt[p.id] = chat_prompt_ids(tokenizer, p.messages)
            ids = [by_prompt[p.id] for p, _, _ in chunk]
            keep = sorted((i for i in range(len(chunk)) if len(ids[i]) <= limit), key=lambda i: len(ids[i]))
            stats.too_long += len({chunk[i][0].id for i in range(len(chunk))} - {chunk[i][0].id for i in keep})
            params = []
            for i in keep:
                p, k, rid = chunk[i]
                t = 0.0 if n > 1 and k == 0 else temperature
                params.append(SamplingParams(temperature=t, top_p=top_p if t else 1.0, top_k=top_k if t else 0,
                                             min_p=min_p if t else 0.0, seed=prompt_seed(rid, seed),
                                             max_tokens=max_new_tokens))
            outputs = engine.generate([ids[i] for i in keep], params) if keep else []
            by_index = dict(zip(keep, zip(outputs, params)))
            for i, (p, k, rid) in enumerate(chunk):        # the prompts' own order, not the sort's
                if i not in by_index:
                    continue
                o, sp = by_index[i]
                rec = {"id": rid, "prompt_id": p.id, "sample": k, "source": p.source, "prompt": p.text,
                       "temperature": sp.temperature, "seed": sp.seed, "prompt_ids": ids[i],
                       "response_ids": o.token_ids, "finish_reason": o.finish_reason}
                if with_text:
                    rec["response"] = tokenizer.decode(o.token_ids)
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats.generated_tokens += len(o.token_ids)
            out.flush()
            os.fsync(out.fileno())
            stats.written += len(outputs)
            slowest = max(slowest, time.perf_counter() - t_chunk)
            stats.elapsed_s = time.perf_counter() - t0
            bar.update(len(chunk))
            bar.set_postfix(written=stats.written, tok_s=f"{stats.tokens_per_s:.0f}")
    bar.close()
    stats.elapsed_s = time.perf_counter() - t0
    return stats


# -- command line ---------------------------------------------------------------------------
def add_regen_parser(subparsers) -> argparse.ArgumentParser:
    """`ascend-dspark regen ...`: register on the CLI's subparsers (sets func=run_regen)."""
    p = subparsers.add_parser("regen", help="regenerate training responses with the target (DeepSpec data)")
    p.add_argument("--model", default="default", help="target: 'default', an HF dir or a .gguf")
    p.add_argument("--sources", default=",".join(TRAIN_SETS), help=f"comma list of {', '.join(TRAIN_SETS)}")
    p.add_argument("--limit-per-source", type=int, default=None, help="prompts per source (default: all)")
    p.add_argument("--prompts", default=None,
                   help="read the prompts from this JSONL (written by --prompts-out) instead of --sources")
    p.add_argument("--prompts-out", default=None,
                   help="only build the prompt mix (checked disjoint from the eval sets), write it here and "
                        "exit: no model is loaded (prepare on a CPU machine, regenerate on the GPU one)")
    p.add_argument("--out", default=None, help="JSONL file, appended to (resumes a previous run)")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="skip longer prompts (default: max_model_len - max_new_tokens)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: 2048 or prompt + new tokens")
    p.add_argument("--batch-size", type=int, default=256,
                   help="engine batch = chunk written at a time (SmolLM2 on an H200: 1024 gives ~3.5x the "
                        "tokens/s of 256 at 72 GiB peak; eager decoding is launch-bound)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--top-p", type=float, default=TOP_P)
    p.add_argument("--top-k", type=int, default=TOP_K)
    p.add_argument("--seed", type=int, default=0, help="prompt subset and per-prompt sampling seeds")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="records per prompt: with n > 1, ids <prompt id>#k, sample 0 greedy, the rest sampled")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="requests handed to the engine (and appended) at a time; default the batch size. A chunk "
                        "several batches long keeps continuous batching full until its tail")
    p.add_argument("--graph-buckets", default=None,
                   help="comma list of decode batch sizes to capture as graphs (default: the engine's)")
    p.add_argument("--shards", default=None, metavar="DIR",
                   help="also pack --out into compact uint16 shards here (appending what is new; see shards.py)")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop cleanly before overrunning this")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] | npu[:N] (default: detect)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the device's; bf16 on GPUs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_regen)
    return p


def run_regen(args: argparse.Namespace) -> int:
    """Body of `ascend-dspark regen`: load the target, regenerate, print one summary line."""
    from ascend_dspark.engine.llm import LLM

    if args.prompts:
        prompts = read_prompts(args.prompts)
    else:
        sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
        prompts = training_mix(args.limit_per_source, args.seed, sources)
    if args.prompts_out:
        save_prompts(prompts, args.prompts_out)
        print(f"wrote {len(prompts)} prompts to {args.prompts_out}")
        return 0
    if not args.out:
        raise ValueError("regen needs --out FILE.jsonl (or --prompts-out to only write the prompt mix)")
    max_model_len = args.max_model_len or max(2048, (args.max_prompt_tokens or 0) + args.max_new_tokens)
    options = {}
    if args.graph_buckets:
        options["graph_buckets"] = [int(b) for b in args.graph_buckets.split(",") if b.strip()]
    llm = LLM(model=args.model, drafter="none", device=args.device, dtype=args.dtype,
              max_model_len=max_model_len, max_batch_size=args.batch_size, seed=args.seed,
              progress=not args.no_progress, **options)
    stats = regenerate(llm.engine, llm.tokenizer, prompts, args.out, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed,
                       samples_per_prompt=args.samples_per_prompt, chunk_size=args.chunk_size or args.batch_size,
                       max_prompt_tokens=args.max_prompt_tokens, time_budget_s=args.time_budget_s,
                       progress=not args.no_progress)
    total = len(read_records(args.out))
    print(f"[{llm.platform.name}] regen: {stats.written} new records ({total} in {args.out}), "
          f"{stats.generated_tokens} tokens in {stats.elapsed_s:.1f} s ({stats.tokens_per_s:.0f} tokens/s) | "
          f"skipped {stats.existing} existing, {stats.duplicates} duplicates, {stats.too_long} too long"
          f"{' | stopped by the time budget' if stats.stopped_early else ''}")
    print(json.dumps({**asdict(stats), "tokens_per_s": stats.tokens_per_s}))
    if args.shards:
        from .shards import pack

        print(json.dumps({"shards": args.shards, **pack([args.out], args.shards)}))
    return 0


def main_regen(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m ascend_dspark.training.regen --out data.jsonl ...`."""
    parser = argparse.ArgumentParser(prog="ascend-dspark")
    add_regen_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["regen", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main_regen(sys.argv[1:]))
