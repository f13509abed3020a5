"""The tokenizer over HTTP, in vLLM's shapes: `POST /tokenize`, `POST /detokenize` and
`GET /tokenizer_info`, at the server's root as vLLM has them.

Evaluation harnesses use them to count and cut prompts with the server's own tokenizer, so
they need no local copy of it: lm-eval's `local-completions` switches to its remote
tokenizer when `/tokenizer_info` answers a dict with `eos_token` and `/tokenize` answers
`tokens`, and renders chat prompts with the `chat_template` from `/tokenizer_info`.

    /tokenize     {model?, prompt, add_special_tokens=true, return_token_strs=false}, or the
                  chat form {model?, messages, add_generation_prompt=true, ...}: the template
                  rendered to text, then encoded (add_special_tokens=false, as vLLM: the
                  template writes its own) -> {count, max_model_len, tokens, token_strs}
    /detokenize   {model?, tokens} -> {prompt}
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .errors import APIError, documented
from .generation import check_model
from .protocol import ChatMessage, _Strict
from .state import ServerState, get_state

router = APIRouter(tags=["tokenizer"], responses=documented(401, 503))


class TokenizeRequest(_Strict):
    """vLLM's two request forms in one body (so a mistake gets one plain message): `prompt`,
    or `messages` with the chat-only fields."""

    model: str | None = None
    prompt: str | None = Field(None, description="the text form")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="the chat form")
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, false for messages")
    add_generation_prompt: bool | None = Field(None, description="chat form only; default true")
    continue_final_message: bool | None = Field(None, description="chat form only; default false")
    return_token_strs: bool = False

    def checked(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give either 'prompt' (text) or 'messages' (chat), not both or neither",
                           param="prompt")
        if self.prompt is not None:
            for name in ("add_generation_prompt", "continue_final_message"):
                if getattr(self, name) is not None:
                    raise APIError(400, f"'{name}' applies to 'messages' only", param=name)
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, responses=documented(400, 404))
async def tokenize(req: TokenizeRequest, request: Request) -> TokenizeResponse:
    req = req.checked()
    state = get_state(request)
    check_model(state, req.model)
    hf = state.tokenizer.hf
    chat = req.messages is not None
    text = _render_chat(state, req) if chat else req.prompt
    special = req.add_special_tokens if req.add_special_tokens is not None else not chat
    tokens = [int(t) for t in hf.encode(text, add_special_tokens=special)]
    return TokenizeResponse(count=len(tokens), max_model_len=state.config.max_model_len, tokens=tokens,
                            token_strs=list(hf.convert_ids_to_tokens(tokens)) if req.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=documented(400, 404))
async def detokenize(req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    check_model(state, req.model)
    vocab = state.tokenizer.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids must be in [0, {vocab}); got {bad[0]}", param="tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens, skip_special_tokens=False))


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    """The tokenizer's settings (its init kwargs, special tokens as text), its class, chat
    template, and `model_max_length` = the server's max_model_len (what it accepts)."""
    state = get_state(request)
    hf = state.tokenizer.hf
    info = {k: _plain(v) for k, v in getattr(hf, "init_kwargs", {}).items()}
    info = {k: v for k, v in info.items() if v is not _SKIP}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info[name] = getattr(hf, name, None)
    info.update(tokenizer_class=type(hf).__name__, chat_template=getattr(hf, "chat_template", None),
                model_max_length=state.config.max_model_len, vocab_size=state.tokenizer.vocab_size)
    return info


def _render_chat(state: ServerState, req: TokenizeRequest) -> str:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        return state.tokenizer.hf.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt is not False,
                                                      continue_final_message=bool(req.continue_final_message))
    except Exception as exc:      # no template, or the template refuses the conversation (jinja raise)
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None


_SKIP = object()


def _plain(value):
    """A JSON value for an init kwarg: special tokens (AddedToken) as their text; what has no
    JSON form is left out."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "content"):
        return str(value.content)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict):
        items = {str(k): _plain(v) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in items.values()) else items
    return _SKIP
