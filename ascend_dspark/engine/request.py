"""One request's life in the engine, and what each engine step reports about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ascend_dspark.spec.acceptance import RequestAcceptance
from ascend_dspark.spec.grammar import RequestGrammar
from ascend_dspark.spec.sampling import SamplingParams

from .detokenizer import IncrementalText
from .outputs import RequestStats


class Status(Enum):
    WAITING = "waiting"        # queued, or preempted and waiting to be recomputed
    PREFILL = "prefill"        # owns a slot; prompt chunks still being computed
    RUNNING = "running"        # decoding: draft -> verify -> commit every step
    FINISHED = "finished"


@dataclass
class Request:
    """Host-side state. `tokens` is prompt + output; the target's KV holds the first
    `num_cached` of them, and while decoding the last token (the anchor) is not in the cache:
    `num_cached == len(tokens) - 1`."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams            # seed always set (the engine draws one if the user gave none)
    stop_ids: frozenset[int]
    arrival: int                      # admission order (preemption evicts the newest)
    output: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    status: Status = Status.WAITING
    slot: int | None = None
    num_cached: int = 0
    finish_reason: str | None = None
    text: str = ""                    # committed text (stop strings cut it), when the engine has a tokenizer
    emitted_text: int = 0             # characters of `text` already reported in deltas
    emitted_tokens: int = 0           # tokens of `output` already reported in deltas
    detokenize: bool = False          # keep `text` up to date every step (streaming, stop strings)
    detokenizer: IncrementalText = field(default_factory=IncrementalText)
    logprobs: list = field(default_factory=list)    # per output token, when params.logprobs is set
    # Per prompt token after the first, when params.prompt_logprobs is set: (logprob, top-n);
    # sent once, with the request's first delta.
    prompt_logprobs: list = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    acceptance: RequestAcceptance = field(default_factory=RequestAcceptance)   # the confidence policy's estimate
    pinned_depth: bool = False        # seeded and sampled: always verifies its cap (engine._verify_lens)
    drafter_asleep: bool = False      # never drafts: admitted or running while the drafter slept
    grammar: RequestGrammar | None = None   # structured output: the matcher of the committed output
    error: str | None = None          # why the request was aborted by the engine (a grammar failure)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output

    @property
    def prefill_target(self) -> int:
        """Positions the prefill must put in the cache: the prompt, or (after preemption)
        everything but the anchor."""
        return len(self.prompt_ids) if not self.output else len(self.prompt_ids) + len(self.output) - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestDelta:
    """What one `Engine.step()` produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str | None            # None when the engine has no tokenizer
    finish_reason: str | None         # "stop", "length", "abort", or None while running
    stats: RequestStats
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None   # per new token: (its logprob, top-n)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None   # per prompt token after the
                                                                                # first (first delta only)
    error: str | None = None          # set with finish_reason "abort" when the engine stopped the request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
