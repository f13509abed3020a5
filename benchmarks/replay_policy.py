"""Replay speculation policies on this CPU against a GPU's measured step costs.

A served sweep shows *that* a policy lost at some load; this shows *why*, and whether a
change to the policy's rules would have decided otherwise, without the GPU. The real target
and its shipped DSpark draft decode real prompts here (so acceptance is real, float32), under
continuous batching at `--batch` sequences; every decode step is charged what the GPU's cost
table says a step of its batch size and depth costs: the table the spec server's policy held
at the end of one sweep level (serve_bench.py's `server_step_costs`: measured cells, the
others their profile plus the batch size's overhead). The result is a *model* of the GPU's
decode time, not a measurement: prefill steps are left out (every policy prefills the same
prompts), and so is whatever a served step costs beyond the table.

    python benchmarks/replay_policy.py --sweep poisson_mtbench.json --level 16 --dataset mtbench \
        --prompts 48 --batch 16 --max-tokens 128 [--rate 32] --out replay.json

`--rate`: requests arrive as a Poisson stream against the modelled clock (the sweep's load
pattern) instead of all at once.

Policies: `confidence` (this engine's default), `confidence_sleep_on_any_run` (its sleep rule
before stop 15: asleep after SLEEP_AFTER depth-0 plans whatever the acceptance measured across
requests says), `fixed` (K every step) and `plain` (no drafter: the table's drafter-free
column). Output tokens are identical across policies (greedy, lossless); the JSON (and
stdout) has per policy the decode steps, depths, sleeps and the modelled tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POLICIES = ("confidence", "confidence_sleep_on_any_run", "fixed", "plain")


def cost_table(level: dict):
    """The policy's view at the end of a sweep level, as a StepCosts with fixed cells."""
    from ascend_dspark.engine.step_costs import StepCosts

    c = level["server_step_costs"]
    over = c["overhead_ms"]
    seconds = [[(m if m is not None else p + over[i]) / 1e3 for m, p in zip(measured, profiled)]
               for i, (measured, profiled) in enumerate(zip(c["measured_ms"], c["profiled_ms"]))]
    plain = [(m if m is not None else p + over[i]) / 1e3
             for i, (m, p) in enumerate(zip(c["plain_measured_ms"], c["plain_profiled_ms"]))]
    return StepCosts(c["batch_sizes"], c["depths"], seconds, padded=True, device=c.get("device", ""),
                     plain_seconds=plain)


def sleep_on_any_run(policy) -> None:
    """The sleep rule before stop 15 on this policy object: SLEEP_AFTER depth-0 plans in a row
    put the drafter to sleep, whatever the engine-wide acceptance says."""
    from ascend_dspark.engine.speculation import SLEEP_AFTER

    def plan_sleep(self, depth: int, rows: int) -> None:
        self._plain_streak = self._plain_streak + 1 if depth == 0 else 0
        if self._plain_streak >= SLEEP_AFTER and not self.drafter_asleep:
            self.drafter_asleep = True
            self.sleeps += 1
            for r in self._requests.values():
                r.drafter_asleep = r.drafter_asleep or not r.pinned_depth

    policy._plan_sleep = types.MethodType(plan_sleep, policy)


def charge_steps(engine, costs) -> dict:
    """Wrap the policy's step_read: every launch that decoded rows is charged its table cost."""
    tally = {"steps": 0, "seconds": 0.0, "depths": [0] * (engine.num_speculative_tokens + 1)}
    policy, read = engine.policy, engine.policy.step_read

    def step_read(rows, depth, drafter_ran, steps, decode_only):
        if rows:
            plain = depth == 0 and not drafter_ran
            tally["steps"] += steps
            tally["seconds"] += steps * costs.step_seconds(rows, depth, plain=plain)
            tally["depths"][depth] += steps
        return read(rows, depth, drafter_ran, steps, decode_only)

    policy.step_read = step_read
    return tally


def run(policy_name: str, ids: list[list[int]], costs, args) -> dict:
    from ascend_dspark.engine.llm import LLM
    from ascend_dspark.spec.sampling import SamplingParams

    speculation = {"fixed": "fixed", "plain": None}.get(policy_name, "confidence")
    llm = LLM(model="default", drafter="none" if policy_name == "plain" else "dspark", device="cpu",
              dtype="float32", max_model_len=max(map(len, ids)) + args.max_tokens + 16, max_batch_size=args.batch,
              speculation=speculation, step_costs=costs if speculation == "confidence" else None, progress=False)
    engine = llm.engine
    if policy_name == "confidence_sleep_on_any_run":
        sleep_on_any_run(engine.policy)
    tally = charge_steps(engine, costs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    if args.rate:
        token_ids, duration = poisson(engine, ids, params, args, tally)
    else:
        token_ids, duration = [o.token_ids for o in engine.generate(ids, params)], tally["seconds"]
    decode_tokens = sum(map(len, token_ids)) - len(token_ids)     # each one's first token comes from its prefill
    return {"policy": policy_name, "decode_steps": tally["steps"], "modelled_decode_s": tally["seconds"],
            "modelled_duration_s": duration, "decode_tokens": decode_tokens,
            "modelled_tok_per_s": decode_tokens / tally["seconds"], "tokens_per_step": decode_tokens / tally["steps"],
            "depth_steps": tally["depths"], "sleeps": engine.drafter_sleeps, "cpu_wall_s": time.perf_counter() - start,
            "token_ids": token_ids}


def poisson(engine, ids: list[list[int]], params, args, tally: dict) -> tuple[list[list[int]], float]:
    """Requests arriving as a seeded Poisson stream of `args.rate` per modelled second, at most
    `args.batch` in flight (serve_bench.py's client-side cap), against a clock that advances by
    each step's charged cost (prefill steps are free): the served sweep's load pattern, which
    closed-loop `generate` lacks (batch sizes that rise and fall, requests joining one by one)."""
    rng = random.Random(args.seed)
    arrivals, t = [], 0.0
    for _ in ids:
        t += rng.expovariate(args.rate)
        arrivals.append(t)
    out: list[list[int]] = [[] for _ in ids]
    clock, admitted, finished = 0.0, 0, 0
    while finished < len(ids):
        while admitted < len(ids) and arrivals[admitted] <= clock and admitted - finished < args.batch:
            engine.add_request(str(admitted), ids[admitted], params, detokenize=False)
            admitted += 1
        if not engine.has_unfinished():
            clock = arrivals[admitted]
            continue
        charged = tally["seconds"]
        for delta in engine.step():
            out[int(delta.request_id)].extend(delta.new_token_ids)
            finished += delta.finish_reason is not None
        clock += tally["seconds"] - charged
    return out, clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, required=True, help="serve_bench.py results with a spec mode")
    parser.add_argument("--level", type=int, default=64, help="whose table: the spec mode's level at this concurrency")
    parser.add_argument("--dataset", default="mtbench")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rate", type=float, default=None,
                        help="Poisson arrivals per modelled second (default: every prompt queued at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from ascend_dspark.models import load_target
    from ascend_dspark.training.evaluate import prompt_ids
    from ascend_dspark.training.prompts import load_prompts

    torch.set_num_threads(1)
    sweep = json.loads(args.sweep.read_text())
    level = next(r for r in sweep["results"] if r["mode"] == "spec" and r["concurrency"] == args.level)
    costs = cost_table(level)
    _, tokenizer = load_target("default", torch.float32, torch.device("cpu"))
    ids = [prompt_ids(tokenizer, p) for p in load_prompts(args.dataset, limit=args.prompts)]
    rows = []
    for name in args.policies:
        row = run(name, ids, costs, args)
        rows.append(row)
        print(f"{name:28s} {row['modelled_tok_per_s']:8.0f} tok/s modelled, {row['tokens_per_step']:.2f} tokens/step, "
              f"depth steps {row['depth_steps']}, sleeps {row['sleeps']} ({row['cpu_wall_s']:.0f} s here)",
              file=sys.stderr, flush=True)
    reference = rows[0]["token_ids"]
    plain = next((r for r in rows if r["policy"] == "plain"), None)
    for row in rows:
        row["same_tokens_as_first"] = row.pop("token_ids") == reference
        if plain is not None:
            row["vs_plain"] = row["modelled_tok_per_s"] / plain["modelled_tok_per_s"]
    result = {"device_costs": costs.device, "sweep": str(args.sweep), "level": args.level, "dataset": args.dataset,
              "prompts": len(ids), "batch": args.batch, "rate": args.rate, "max_tokens": args.max_tokens, "cpu": "float32, 1 thread",
              "command": " ".join(sys.argv), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps([{k: v for k, v in r.items() if k != "depth_steps"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
