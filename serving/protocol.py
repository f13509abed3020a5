"""The OpenAI wire format as pydantic models: request bodies (validated, so a bad value is a
400 naming the field) and response bodies (so the OpenAPI schema documents them).

Unknown request fields are refused rather than ignored: a parameter that the server would
silently drop (logit_bias, penalties, tools, ...) would change the meaning of the request
without telling anyone. Two extensions, both vLLM-compatible in spirit: `top_k`, `min_p`,
`stop_token_ids`, `ignore_eos` (vLLM's sampling extras) and `num_speculative_tokens`
(cap the draft tokens verified per step for this request; 0 turns speculation off).
Structured output: OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's
`guided_json` / `guided_choice` (serving/structured.py compiles them).
Streaming chunks are plain dicts (built by `generation.respond` and the endpoints in
`openai_api.py`), in the same field layout.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ascend_dspark.spec.sampling import MAX_LOGPROBS

MAX_STOP = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM's: every chunk carries the usage so far "
                                                             "(guidellm asks for it)")


class JSONSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema (absent: any JSON object)")
    strict: bool | None = Field(None, description="accepted; the output always follows the schema exactly")


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: free text, any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a `json_schema` object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"`json_schema` is only read with type json_schema, not {self.type}")
        return self


class _GenerationFields(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1, description="default: what is left of the model's length")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    n: int = Field(1, ge=1, description="choices per prompt (the server caps it)")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    num_speculative_tokens: int | None = Field(
        None, description="extension: at most this many draft tokens drafted and verified per step (the server's "
                          "K at most); 0 = no speculation. Checked where sampling parameters are (SamplingParams)")
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = Field(None, description="vLLM's extension: output JSON valid under this schema")
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=256,
                                            description="vLLM's extension: output exactly one of these strings")

    @model_validator(mode="after")
    def _one_format(self):
        given = [name for name, v in (("guided_json", self.guided_json), ("guided_choice", self.guided_choice))
                 if v is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"at most one of response_format, guided_json and guided_choice: got {', '.join(given)}")
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v not in (None, 0, 0.0):
            raise ValueError("penalties are not supported by this server (only 0)")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, description="default: what is left of the model's length; "
                                                           "0 (with echo): the prompt only")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="prepend the prompt to the text (and, with logprobs, the prompt "
                                          "tokens' logprobs: the first token's is null)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and (not v or (isinstance(v[0], list) and not all(v))):
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def template_messages(self) -> list[dict[str, str]]:
        """What the tokenizer's chat template receives."""
        out = []
        for m in self.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name:
                msg["name"] = m.name
            out.append(msg)
        return out


# -- responses ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Speculation(BaseModel):
    """How speculation went for this request (all choices together)."""

    num_verify_steps: int = Field(description="target forwards that verified drafts (decode steps)")
    num_drafts: int = Field(description="verify steps that checked at least one draft token")
    num_draft_tokens: int
    num_accepted_tokens: int
    mean_accepted_length: float = Field(description="tokens committed per verify step, the bonus token included")
    acceptance_per_position: list[float] = Field(description="conditional acceptance rate of draft position k")


class _Choice(BaseModel):
    index: int
    logprobs: dict | None = None
    finish_reason: str | None


class _Response(BaseModel):
    """What every response and stream chunk carries besides its `object` and `choices`."""

    id: str
    created: int
    model: str


class _FinalResponse(_Response):
    usage: Usage
    speculation: Speculation


class _Chunk(_Response):
    usage: Usage | None = None
    speculation: Speculation | None = None


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_FinalResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_FinalResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


# -- streaming chunks (documented in the schema; built as plain dicts, see generation.respond) ----
class CompletionChunkChoice(_Choice):
    text: str


class CompletionChunk(_Chunk):
    """One event of a streamed completion; the last (with `stream_options.include_usage`) has
    no choices and carries `usage` and `speculation`."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta


class ChatCompletionChunk(_Chunk):
    """One event of a streamed chat completion: first a `role` delta per choice, then text
    deltas; the last (with `stream_options.include_usage`) has no choices and carries
    `usage` and `speculation`."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


STREAM_CHUNKS = (CompletionChunk, ChatCompletionChunk)


def sse_schema(chunk: type[BaseModel]) -> dict:
    """OpenAPI 3.1 schema of one server-sent event of a stream of `chunk`s: its data is a
    chunk as JSON, an error (a timeout or engine failure after the stream started), or the
    closing `[DONE]`."""
    ref = "#/components/schemas/{}"
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"},
        "data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": ref.format(chunk.__name__)}, {"$ref": ref.format("ErrorResponse")}]}},
        ]}}}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ascend-dspark"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
