"""The OpenAI routes: /v1/models, /v1/completions and /v1/chat/completions, streaming
(server-sent events) and not. Each handler only translates: validated request -> prompt
ids and sampling parameters (generation.py) -> engine loop -> OpenAI response or chunks.

Responses carry `usage` and a `speculation` object (this server's extension: drafts,
accepted tokens, mean accepted length); a stream carries both in its final chunk when
`stream_options.include_usage` is set.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from . import generation as gen
from .errors import APIError, documented
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    sse_schema,
)
from .state import ServerState, get_state

router = APIRouter(prefix="/v1", responses=documented(401, 503))
# What a generation route may answer besides its JSON body: the stream, and the errors.
def _generation_responses(chunk) -> dict:
    return {200: {"description": "the response, or with `stream: true` server-sent events "
                                 "(`data: {chunk}` ... `data: [DONE]`)",
                  "content": {"text/event-stream": {"schema": sse_schema(chunk)}}},
            **documented(400, 404, 408, 413, 429, 500)}


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    state = get_state(request)
    return ModelList(data=[ModelCard(id=state.config.model_name, created=state.started,
                                     max_model_len=state.config.max_model_len)])


@router.post("/completions", response_model=CompletionResponse, responses=_generation_responses(CompletionChunk))
async def completions(req: CompletionRequest, request: Request):
    state = get_state(request)
    gen.check_model(state, req.model)
    arrival = gen.now()
    prompts = [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
    want_logprobs = req.logprobs is not None
    rid = f"cmpl-{uuid.uuid4().hex}"
    sequences = gen.make_sequences(state, req, prompts, req.max_tokens, req.logprobs, "prompt", rid)
    submission = await gen.admit(state, sequences, arrival)
    choices = [gen.Choice() for _ in sequences]
    deadline, created = gen.request_deadline(state, arrival), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.config.model_name}

    if req.stream:
        offsets = [0] * len(sequences)

        def on_delta(index, delta):
            text, entries = choices[index].add(delta)
            if not text and not entries and delta.finish_reason is None:
                return []
            logprobs = gen.completion_logprobs(state, entries, offsets[index]) if want_logprobs and entries else None
            offsets[index] += len(text)
            return [{**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                          "finish_reason": delta.finish_reason}]}]

        def on_end():
            return [_usage_chunk(head, prompts, choices)] if req.include_usage else []

        return gen.EngineStream(submission, deadline, on_delta, on_end, [])

    await gen.collect(submission, deadline, request, choices)
    return CompletionResponse(
        **head, usage=gen.usage(prompts, choices), speculation=gen.speculation(choices),
        choices=[CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                  logprobs=gen.completion_logprobs(state, c.logprobs, 0)
                                  if want_logprobs and c.logprobs else None)
                 for i, c in enumerate(choices)])


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses=_generation_responses(ChatCompletionChunk))
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = get_state(request)
    gen.check_model(state, req.model)
    arrival = gen.now()
    prompts = [_chat_prompt(state, req)]
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    want_logprobs = req.logprobs
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    max_tokens = req.max_completion_tokens or req.max_tokens
    sequences = gen.make_sequences(state, req, prompts, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                   "messages", rid)
    submission = await gen.admit(state, sequences, arrival)
    choices = [gen.Choice() for _ in sequences]
    deadline, created = gen.request_deadline(state, arrival), int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.config.model_name}

    if req.stream:
        first = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}]} for i in range(len(sequences))]

        def on_delta(index, delta):
            text, entries = choices[index].add(delta)
            if not text and not entries and delta.finish_reason is None:
                return []
            logprobs = gen.chat_logprobs(state, entries) if want_logprobs and entries else None
            return [{**head, "choices": [{"index": index, "delta": {"content": text} if text else {},
                                          "logprobs": logprobs, "finish_reason": delta.finish_reason}]}]

        def on_end():
            return [_usage_chunk(head, prompts, choices)] if req.include_usage else []

        return gen.EngineStream(submission, deadline, on_delta, on_end, first)

    await gen.collect(submission, deadline, request, choices)
    return ChatCompletionResponse(
        id=rid, created=created, model=state.config.model_name,
        usage=gen.usage(prompts, choices), speculation=gen.speculation(choices),
        choices=[ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                            logprobs=gen.chat_logprobs(state, c.logprobs) if want_logprobs and c.logprobs else None)
                 for i, c in enumerate(choices)])


def _chat_prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    try:
        return state.tokenizer.apply_chat_template(req.template_messages())
    except Exception as exc:          # no template, or the template refuses the conversation (jinja raise)
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None


def _usage_chunk(head: dict, prompts, choices) -> dict:
    return {**head, "choices": [], "usage": gen.usage(prompts, choices).model_dump(),
            "speculation": gen.speculation(choices).model_dump()}
