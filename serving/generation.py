"""The one handler behind /v1/completions and /v1/chat/completions (`respond`) and what it
is made of: sampling parameters (with per-choice seeds), admission to the engine loop,
waiting with a deadline while watching for the client leaving, streaming, and the
accounting every response carries (usage, speculation statistics). The two endpoints differ
only in how the prompt is built and how a choice is shaped (an `Endpoint`, in openai_api.py),
so validation, admission, streaming or not, usage and errors are written once, here.

Seeds: choice 0 of a seeded request uses the seed itself, so `n=1, seed=s` reproduces the
offline `LLM.generate(..., SamplingParams(seed=s))`; choice i > 0 uses a hash of (s, i),
so the choices differ from each other yet the whole request reproduces.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ascend_dspark.engine.outputs import RequestStats
from ascend_dspark.engine.request import RequestDelta
from ascend_dspark.spec.sampling import SamplingParams

from .engine_loop import (
    EngineUnavailable,
    QueueFull,
    Rejected,
    Sequence,
    Submission,
    TimedOut,
)
from .errors import APIError, error_body
from .protocol import Speculation, Usage, _GenerationFields
from .state import ServerState
from .structured import compile_format

RETRY_AFTER_S = 1


class Endpoint(Protocol):
    """What one generation endpoint does its own way: build the prompt, shape a choice."""

    id_prefix: str                     # response ids are `{id_prefix}-{hex}`
    chunk_object: str                  # the `object` of its stream chunks
    prompt_param: str                  # the parameter a too-long prompt is blamed on
    response: type[BaseModel]          # the non-streaming body, built from id, created, model, usage,
                                       # speculation and choices

    def prompts(self, state: ServerState, req) -> list[list[int]]:
        """Token ids of each prompt; raises APIError for what only this endpoint checks."""
        ...

    def limits(self, req) -> tuple[int | None, int | None]:
        """(max_tokens, logprobs): the output cap (None: what the model's length leaves; 0: none,
        the prompt is only echoed) and the alternatives per token (None: no logprobs)."""
        ...

    def echo(self, state: ServerState, req, prompts: list[list[int]]) -> list[Echo] | None:
        """What each prompt's choices start with (`echo`), or None: nothing."""
        ...

    def logprobs(self, state: ServerState, entries: list, offset: int) -> dict:
        """The logprobs of `entries` in this endpoint's layout; `offset`: where their text starts."""
        ...

    def first_choices(self, n: int) -> list[dict]:
        """A stream's opening choices (one chunk each), before any text."""
        ...

    def chunk_choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        ...

    def choice(self, index: int, choice: Choice, logprobs: dict | None) -> BaseModel:
        ...


async def respond(state: ServerState, request: Request, req: _GenerationFields, endpoint: Endpoint):
    """Serve one generation request: check it, admit its sequences, then stream server-sent
    events or wait for the whole response."""
    check_model(state, req.model)
    arrival = time.monotonic()
    prompts = endpoint.prompts(state, req)
    max_tokens, top_logprobs = endpoint.limits(req)
    echoes = endpoint.echo(state, req, prompts)
    rid = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
    grammar = await compile_format(state, req)
    # Echoed logprobs are the prompt's, from the prefill (a prompt-only request still samples
    # one token, which the choice drops: the engine always generates).
    prompt_logprobs = top_logprobs if echoes is not None else None
    sequences = make_sequences(state, req, prompts, max_tokens, top_logprobs, endpoint.prompt_param, rid, grammar,
                               prompt_logprobs)
    submission = await admit(state, sequences, arrival)
    choices = [Choice(echo=echoes[k // req.n] if echoes is not None else None, keep_output=max_tokens != 0)
               for k in range(len(sequences))]
    deadline, created = arrival + state.config.request_timeout_s, int(time.time())

    def logprobs(entries: list, offset: int) -> dict | None:
        return endpoint.logprobs(state, entries, offset) if top_logprobs is not None and entries else None

    if req.stream:
        head = {"id": rid, "object": endpoint.chunk_object, "created": created, "model": req.model}

        def on_delta(index: int, delta: RequestDelta) -> list[dict]:
            choice = choices[index]
            text, entries = choice.add(delta)
            if not text and not entries and delta.finish_reason is None:
                return []
            offset = len(choice.text) - len(text)
            chunk = {**head, "choices": [endpoint.chunk_choice(index, text, logprobs(entries, offset),
                                                               delta.finish_reason)]}
            if req.stream_options and req.stream_options.continuous_usage_stats:
                chunk["usage"] = usage(prompts, choices).model_dump()
            return [chunk]

        def on_end() -> list[dict]:
            if not req.include_usage:
                return []
            return [{**head, "choices": [], "usage": usage(prompts, choices).model_dump(),
                     "speculation": speculation(choices).model_dump()}]

        first = [{**head, "choices": [choice]} for choice in endpoint.first_choices(len(sequences))]
        return EngineStream(submission, deadline, on_delta, on_end, first)

    await collect(submission, deadline, request, choices)
    return endpoint.response(
        id=rid, created=created, model=req.model,
        usage=usage(prompts, choices), speculation=speculation(choices),
        choices=[endpoint.choice(i, c, logprobs(c.logprobs, 0)) for i, c in enumerate(choices)])


def check_model(state: ServerState, model: str | None) -> None:
    """A request naming a model must name one of the served names (aliases); OpenAI answers
    an unknown one with 404 `model_not_found`."""
    names = state.config.model_names
    if model is not None and model not in names:
        raise APIError(404, f"model '{model}' is not served here; this server serves "
                            f"{', '.join(repr(n) for n in names)}", param="model", code="model_not_found")


def choice_seed(seed: int | None, index: int) -> int | None:
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_sequences(state: ServerState, req: _GenerationFields, prompts: list[list[int]], max_tokens: int | None,
                   logprobs: int | None, prompt_param: str, request_id: str, grammar=None,
                   prompt_logprobs: int | None = None) -> list[Sequence]:
    """n sequences per prompt, with everything the engine would refuse checked here first
    so the client gets a 400 naming the parameter. `max_tokens` 0 runs one token (dropped
    by the choice)."""
    cfg = state.config
    if req.n > cfg.max_n:
        raise APIError(400, f"n is {req.n}; this server allows at most {cfg.max_n}", param="n")
    total = req.n * len(prompts)
    if total > cfg.capacity:
        raise APIError(400, f"the request asks for {total} sequences; this server holds at most {cfg.capacity}",
                       param="n")
    sequences = []
    for p, ids in enumerate(prompts):
        if len(ids) >= cfg.max_model_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens, but this model's maximum length is "
                                f"{cfg.max_model_len} tokens (prompt and output together)",
                           param=prompt_param, code="context_length_exceeded")
        for i in range(req.n):
            cap = max(1, cfg.max_model_len - len(ids)) if max_tokens is None else max(1, max_tokens)
            params = _sampling_params(req, cap, choice_seed(req.seed, i), logprobs, grammar, prompt_logprobs)
            sequences.append(Sequence(f"{request_id}-{p}-{i}", ids, params))
    return sequences


def _sampling_params(req: _GenerationFields, max_tokens: int, seed: int | None, logprobs: int | None,
                     grammar=None, prompt_logprobs: int | None = None) -> SamplingParams:
    try:
        return SamplingParams(temperature=req.temperature, top_k=max(0, req.top_k), top_p=req.top_p,
                              min_p=req.min_p, seed=seed, max_tokens=max_tokens, stop=list(req.stop or []),
                              stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                              num_speculative_tokens=req.num_speculative_tokens, logprobs=logprobs, grammar=grammar,
                              prompt_logprobs=prompt_logprobs)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


async def admit(state: ServerState, sequences: list[Sequence], arrival: float) -> Submission:
    """Hand the sequences to the engine loop and wait until they are in (or refused)."""
    try:
        submission = state.loop.submit(sequences, arrival)
    except QueueFull as exc:
        state.metrics.rejected("queue_full")
        raise APIError(429, f"{exc}; retry in a moment", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineUnavailable as exc:
        state.metrics.rejected("unavailable")
        raise APIError(503, str(exc)) from None
    try:
        await submission.accepted()
    except Rejected as exc:
        state.metrics.rejected("invalid")
        raise APIError(400, str(exc)) from None
    except EngineUnavailable as exc:
        raise APIError(503, str(exc)) from None
    except asyncio.CancelledError:
        submission.abort()
        raise
    return submission


@dataclass(frozen=True)
class Echo:
    """A prompt as its choices repeat it (`echo`): its text and token ids."""

    text: str
    token_ids: list[int]


@dataclass
class Choice:
    """One sequence's output so far. With `echo`, the first delta's text and logprobs start
    with the prompt's (the first prompt token has no logprob: None); without `keep_output`
    (max_tokens 0) the generated token is dropped and the choice is the prompt alone."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] = field(default_factory=list)
    echo: Echo | None = None
    keep_output: bool = True

    def add(self, delta: RequestDelta) -> tuple[str, list]:
        """Fold in a delta; returns (new text, new logprob entries)."""
        text = (delta.text_delta or "") if self.keep_output else ""
        new = []
        if delta.logprobs and self.keep_output:
            new = [(tok, lp, top) for tok, (lp, top) in zip(delta.new_token_ids, delta.logprobs)]
        if self.echo is not None:                      # the first delta: the prompt comes first
            echo, self.echo = self.echo, None
            text = echo.text + text
            if delta.prompt_logprobs is not None:
                head = [(echo.token_ids[0], None, None)]
                head += [(tok, lp, top) for tok, (lp, top) in zip(echo.token_ids[1:], delta.prompt_logprobs)]
                new = head + new
        self.text += text
        self.logprobs += new
        self.num_tokens = delta.num_output_tokens if self.keep_output else 0
        stopped_early = not self.keep_output and delta.finish_reason == "stop"     # the dropped token was EOS
        self.finish_reason = "length" if stopped_early else delta.finish_reason
        self.stats = delta.stats
        return text, new


async def collect(submission: Submission, deadline: float, request: Request, choices: list[Choice]) -> None:
    """Run a non-streaming request to the end. A client that hangs up aborts it at once
    (its slot and KV blocks are freed), not when it would have finished."""
    watcher = asyncio.create_task(_abort_on_disconnect(request, submission))
    try:
        async for index, delta in submission.deltas(deadline):
            choices[index].add(delta)
            if delta.error is not None:
                raise APIError(500, delta.error, code="structured_output_error")
    except TimedOut:
        raise APIError(408, "the request ran past the server's time limit and was stopped",
                       code="timeout") from None
    except EngineUnavailable as exc:
        raise APIError(503, str(exc)) from None
    finally:
        watcher.cancel()
        submission.abort()


async def _abort_on_disconnect(request: Request, submission: Submission) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            submission.abort()
            return


class EngineStream(StreamingResponse):
    """An SSE response that aborts its request however it ends: even when the client leaves
    before the body starts (then the event generator never runs, and its own cleanup with it)."""

    def __init__(self, submission: Submission, deadline: float, on_delta, on_end, first: list[dict]) -> None:
        super().__init__(sse(submission, deadline, on_delta, on_end, first), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.submission = submission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.submission.abort()


async def sse(submission: Submission, deadline: float, on_delta: Callable[[int, RequestDelta], list[dict]],
              on_end: Callable[[], list[dict]], first: list[dict]) -> AsyncIterator[str]:
    """Server-sent events: `first`, the chunks `on_delta` makes of each delta, `on_end`'s, then
    `data: [DONE]`. A timeout or engine failure becomes an error event (the status line is
    already sent). When the client disconnects, Starlette cancels this generator and the
    `finally` aborts the request."""
    try:
        try:
            for chunk in first:
                yield _event(chunk)
            async for index, delta in submission.deltas(deadline):
                for chunk in on_delta(index, delta):
                    yield _event(chunk)
                if delta.error is not None:
                    yield _event(error_body(delta.error, "server_error", code="structured_output_error"))
            for chunk in on_end():
                yield _event(chunk)
        except TimedOut:
            yield _event(error_body("the request ran past the server's time limit and was stopped",
                                    "timeout_error", code="timeout"))
        except EngineUnavailable as exc:
            yield _event(error_body(str(exc), "service_unavailable"))
        yield "data: [DONE]\n\n"
    finally:
        submission.abort()


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage(prompts: list[list[int]], choices: list[Choice]) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(c.num_tokens for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def speculation(choices: list[Choice]) -> Speculation:
    """Speculation statistics of all choices together, from the engine's RequestStats."""
    accepted = [a for c in choices for a in c.stats.accepted_lengths]
    proposed = [p for c in choices for p in c.stats.proposal_lengths]
    width = max((len(c.stats.position_reached) for c in choices), default=0)
    reached, hits = [0] * width, [0] * width
    for c in choices:
        for k, (r, a) in enumerate(zip(c.stats.position_reached, c.stats.position_accepted)):
            reached[k] += r
            hits[k] += a
    return Speculation(
        num_verify_steps=len(accepted), num_drafts=sum(1 for p in proposed if p > 0),
        num_draft_tokens=sum(proposed), num_accepted_tokens=sum(min(a - 1, p) for a, p in zip(accepted, proposed)),
        mean_accepted_length=sum(accepted) / len(accepted) if accepted else 0.0,
        acceptance_per_position=[h / r if r else 0.0 for h, r in zip(hits, reached)])
