"""The OpenAI routes: /v1/models, /v1/completions and /v1/chat/completions, streaming
(server-sent events) and not. Both generation routes run one handler (generation.respond:
validation, admission, streaming or not, usage, errors); what differs is here, as an
Endpoint each: how the prompt is built (text or token ids vs the chat template) and how a
choice is shaped (text vs a message or delta, OpenAI's two logprobs layouts).

Responses carry `usage` and a `speculation` object (this server's extension: drafts,
accepted tokens, mean accepted length); a stream carries both in its final chunk when
`stream_options.include_usage` is set.
"""

from __future__ import annotations

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
    return ModelList(data=[ModelCard(id=name, created=state.started, max_model_len=state.config.max_model_len)
                           for name in state.config.model_names])


@router.post("/completions", response_model=CompletionResponse, responses=_generation_responses(CompletionChunk))
async def completions(req: CompletionRequest, request: Request):
    return await gen.respond(get_state(request), request, req, COMPLETIONS)


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses=_generation_responses(ChatCompletionChunk))
async def chat_completions(req: ChatCompletionRequest, request: Request):
    return await gen.respond(get_state(request), request, req, CHAT)


class Completions:
    """Prompts are text or token ids, several at once; a choice is text, logprobs in the
    legacy layout (parallel lists, each token's offset in the choice's text). With `echo` the
    choice starts with the prompt, and its logprobs with the prompt tokens' (what
    log-likelihood evaluations send: `echo`, `logprobs`, `max_tokens` 0 or 1), as vLLM
    answers: the first prompt token's logprob and alternatives are null, `top_logprobs` holds
    the top-n plus the token itself, and -inf is reported as -9999 (JSON has no infinity)."""

    id_prefix, chunk_object, prompt_param, response = "cmpl", "text_completion", "prompt", CompletionResponse

    def prompts(self, state: ServerState, req: CompletionRequest) -> list[list[int]]:
        return [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]

    def limits(self, req: CompletionRequest) -> tuple[int | None, int | None]:
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 returns only the prompt: it needs echo: true", param="max_tokens")
        return req.max_tokens, req.logprobs

    def echo(self, state: ServerState, req: CompletionRequest, prompts: list[list[int]]) -> list[gen.Echo] | None:
        if not req.echo:
            return None
        return [gen.Echo(p if isinstance(p, str) else state.tokenizer.decode(ids, skip_special_tokens=False), ids)
                for p, ids in zip(req.prompts(), prompts)]

    def logprobs(self, state: ServerState, entries: list, offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tok, lp, top in entries:
            text = _token_text(state, tok)
            tokens.append(text)
            token_lps.append(None if lp is None else max(lp, MIN_LOGPROB))
            tops.append(None if top is None else {**{_token_text(state, t): max(v, MIN_LOGPROB) for t, v in top},
                                                  text: max(lp, MIN_LOGPROB)})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def first_choices(self, n: int) -> list[dict]:
        return []

    def chunk_choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def choice(self, index: int, choice: gen.Choice, logprobs: dict | None) -> CompletionChoice:
        return CompletionChoice(index=index, text=choice.text, finish_reason=choice.finish_reason, logprobs=logprobs)


class Chat:
    """One prompt from the tokenizer's chat template; a choice is an assistant message (a
    stream opens with a role delta per choice), logprobs per token with its bytes."""

    id_prefix, chunk_object, prompt_param, response = ("chatcmpl", "chat.completion.chunk", "messages",
                                                       ChatCompletionResponse)

    def prompts(self, state: ServerState, req: ChatCompletionRequest) -> list[list[int]]:
        try:
            prompt = state.tokenizer.apply_chat_template(req.template_messages())
        except Exception as exc:      # no template, or the template refuses the conversation (jinja raise)
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return [prompt]

    def limits(self, req: ChatCompletionRequest) -> tuple[int | None, int | None]:
        return req.max_completion_tokens or req.max_tokens, (req.top_logprobs or 0) if req.logprobs else None

    def echo(self, state: ServerState, req: ChatCompletionRequest, prompts: list[list[int]]) -> None:
        return None

    def logprobs(self, state: ServerState, entries: list, offset: int) -> dict:
        def item(tok: int, lp: float) -> dict:
            text = _token_text(state, tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**item(tok, lp), "top_logprobs": [item(t, v) for t, v in top]}
                            for tok, lp, top in entries]}

    def first_choices(self, n: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]

    def chunk_choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def choice(self, index: int, choice: gen.Choice, logprobs: dict | None) -> ChatChoice:
        return ChatChoice(index=index, message=AssistantMessage(content=choice.text),
                          finish_reason=choice.finish_reason, logprobs=logprobs)


COMPLETIONS, CHAT = Completions(), Chat()
MIN_LOGPROB = -9999.0          # what -inf is reported as (vLLM's value)


def _token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id], skip_special_tokens=False)
