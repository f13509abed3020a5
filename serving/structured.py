"""Structured output requests: the format a request asks for, compiled into a grammar off the
engine loop.

`response_format` (OpenAI): `{"type": "json_object"}` (any JSON object) or
`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (JSON valid under the
schema; without a schema, any JSON object); `{"type": "text"}` is free text. vLLM's
`guided_json` (a schema) and `guided_choice` (one of a list of strings) are the same
machinery. The grammar compiler reads the whole vocabulary once: it is built on first use
in a worker thread, as is every compilation, so neither the event loop nor the engine loop
waits on it. A schema that cannot be compiled is a 400 naming the parameter.
"""

from __future__ import annotations

import asyncio
import threading

from ascend_dspark.spec.grammar import CompiledGrammar, GrammarCompiler, GrammarError

from .errors import APIError
from .protocol import _GenerationFields
from .state import ServerState

_LOCK = threading.Lock()


async def compile_format(state: ServerState, req: _GenerationFields) -> CompiledGrammar | None:
    """The request's grammar, or None for free text."""
    fmt, param = req.response_format, "response_format"
    if req.guided_json is not None:
        kind, arg, param = "json_schema", req.guided_json, "guided_json"
    elif req.guided_choice is not None:
        kind, arg, param = "choice", req.guided_choice, "guided_choice"
    elif fmt is None or fmt.type == "text":
        return None
    elif fmt.type == "json_object" or fmt.json_schema.schema_ is None:
        kind, arg = "json_object", None
    else:
        kind, arg = "json_schema", fmt.json_schema.schema_
    try:
        return await asyncio.to_thread(_compile, state, kind, arg)
    except GrammarError as exc:
        raise APIError(400, str(exc), param=param) from None


def _compile(state: ServerState, kind: str, arg) -> CompiledGrammar:
    compiler = _compiler(state)
    if kind == "json_schema":
        return compiler.json_schema(arg)
    if kind == "choice":
        return compiler.choice(arg)
    return compiler.json_object()


def _compiler(state: ServerState) -> GrammarCompiler:
    with _LOCK:
        if state.grammars is None:
            engine = state.loop.engine
            state.grammars = GrammarCompiler.for_tokenizer(state.tokenizer.hf, engine.target.config.vocab_size,
                                                           sorted(engine.outputs.eos_token_ids))
        return state.grammars
