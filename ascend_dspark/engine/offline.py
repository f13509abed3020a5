"""Offline generation over an engine: queue every prompt at once, step until all are done
(continuous batching does the rest), and split the wall time into prefill and decode steps.
`Engine.generate` is this; the server drives `Engine.step` itself.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from ascend_dspark.spec.sampling import SamplingParams

from .outputs import RequestOutput

_REQUEST_IDS = itertools.count()       # generate-N: unique in the process, so in every engine


@dataclass
class GenerateTimings:
    """Wall-clock split of the last generate() call: steps that ran a prefill chunk count as
    prefill, steps that only decoded as decode."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.generated_tokens / total if total else 0.0


def generate(engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             progress: bool = False) -> list[RequestOutput]:
    """Every prompt's output, in order; all prompts are added or none (a bad one raises
    ValueError and aborts those already added). Sets `engine.timings`."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    requests = []
    try:
        for prompt, p in zip(prompts, params):
            rid = f"generate-{next(_REQUEST_IDS)}"
            engine.add_request(rid, prompt, p, detokenize=bool(p.stop))
            requests.append(engine.requests[rid])
    except ValueError:
        for r in requests:                      # all or nothing
            engine.abort(r.request_id)
        raise
    timings = engine.timings = GenerateTimings()
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, unit="req")
    engine.platform.synchronize()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        deltas = engine.step()
        elapsed = time.perf_counter() - t0            # step() ends with its host copy: synchronised
        if engine.ran_prefill:
            timings.prefill_s += elapsed
        else:
            timings.decode_s += elapsed
        bar.update(sum(d.finished for d in deltas))
    bar.close()
    timings.generated_tokens = sum(len(r.output) for r in requests)
    return [RequestOutput(r.prompt_ids, r.output, r.finish_reason or "length", r.stats,
                          r.text if r.params.stop else None,
                          prompt_logprobs=r.prompt_logprobs if r.params.prompt_logprobs is not None else None)
            for r in requests]
