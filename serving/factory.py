"""`create_app(config)`: the FastAPI application of one server.

The model is loaded in the lifespan (so `uvicorn` binds its port only once the engine is
ready, and a load failure stops the server before it accepts anything), on the engine
loop's own thread (see engine_loop.py). Shutdown is graceful: uvicorn first lets open
requests finish (or cancels them after `--timeout-graceful-shutdown`, which aborts their
engine requests); then new requests are refused, whatever is still admitted gets up to
`shutdown_grace_s` to finish, the rest is aborted and the loop thread ends.

Routes live in one router per concern (openai_api, tokenizer_api, system_api, page: the built-in chat
and speculation page at /); a new one is one more router included here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .config import ServerConfig
from .engine_loop import EngineLoop
from .errors import install_handlers
from .gc_pauses import GcPauses, freeze_startup_objects, thaw
from .metrics import Metrics
from .middleware import ApiKey, BodyLimit
from .state import ServerState
from .system_api import package_version

logger = logging.getLogger(__name__)
# What needs the API key, when one is set: the OpenAI routes and the tokenizer's (vLLM's layout).
KEYED_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


def create_app(config: ServerConfig) -> FastAPI:
    from . import openai_api, page, system_api, tokenizer_api

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await asyncio.to_thread(start_engine, config)
        app.state.server = state
        try:
            yield
        finally:
            await shutdown(state, config.shutdown_grace_s)
            app.state.server = None

    app = FastAPI(title="ascend-dspark", version=package_version(), lifespan=lifespan,
                  description="OpenAI-compatible server over the DSpark speculative decoding engine")
    app.state.config = config
    app.state.server = None
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(ApiKey, api_key=config.api_key, prefix=KEYED_PATHS)    # outermost: before the body is read
    app.include_router(openai_api.router)
    app.include_router(tokenizer_api.router)
    app.include_router(system_api.router)
    app.include_router(page.router)
    _document_our_errors(app)
    return app


def _document_our_errors(app: FastAPI) -> None:
    """Two corrections to FastAPI's schema. It documents a 422 with its own error body on
    every route with parameters; this server answers invalid input with a 400 in OpenAI's
    shape instead (errors.py, declared per route), so the 422 and the models only it used
    go. And the streamed chunks, which the routes build as plain dicts, are added as
    components, for the event-stream responses that refer to them (protocol.sse_schema)."""
    from pydantic.json_schema import models_json_schema

    from .protocol import STREAM_CHUNKS

    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            _, chunks = models_json_schema([(m, "serialization") for m in STREAM_CHUNKS],
                                           ref_template="#/components/schemas/{model}")
            for name, definition in chunks.get("$defs", {}).items():
                components.setdefault(name, definition)
        return app.openapi_schema

    app.openapi = openapi


def llm_options(config: ServerConfig) -> dict:
    """The LLM every rank builds (tensor parallelism: the same on each, or they disagree)."""
    return dict(model=config.model, drafter=config.drafter, num_speculative_tokens=config.num_speculative_tokens,
                device=config.device, dtype=config.dtype, max_model_len=config.max_model_len,
                max_batch_size=config.max_num_seqs, seed=config.seed, speculation=config.speculation,
                tensor_parallel_size=config.tensor_parallel_size,
                decode_steps_per_launch=config.decode_steps_per_launch, prefill_graphs=config.prefill_graphs)


def follow_as_rank(config: ServerConfig) -> None:
    """A tensor-parallel rank other than 0: load the shard, follow rank 0 until it stops."""
    from ascend_dspark.engine.llm import LLM

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK')}] %(levelname)s %(message)s")
    LLM(**llm_options(config))


def start_engine(config: ServerConfig) -> ServerState:
    """Build the engine on the engine loop's thread and start serving; blocks until ready.
    What the server needs of it afterwards (tokenizer, platform, K) is on the engine.

    With `tensor_parallel_size` > 1 and no torchrun around it, this process becomes rank 0
    and starts the other ranks (distributed/spawn.py), whose deaths a watchdog reports as
    the engine's failure (/health 503); under torchrun, torchrun started and watches them."""
    from ascend_dspark.distributed import Watchdog, launched_by_torchrun, spawn_ranks
    from ascend_dspark.engine.llm import LLM

    metrics = Metrics(config.model_name)
    loop = EngineLoop(metrics, config.capacity)
    children = []
    if config.tensor_parallel_size > 1 and not launched_by_torchrun():
        children = spawn_ranks(config.tensor_parallel_size, follow_as_rank, (config,))

    def build():
        llm = LLM(**llm_options(config))
        if children:
            Watchdog(children, llm.tp.fail)
        return llm.engine

    t0 = time.perf_counter()
    loop.start(build)
    loop.wait_ready()
    engine = loop.engine
    logger.info("engine ready in %.1f s: model %s, drafter %s (K=%d), %s", time.perf_counter() - t0,
                config.model, config.drafter, engine.num_speculative_tokens, engine.platform.describe())
    gc_pauses = GcPauses(metrics.gc_pause, config.model_name)
    gc_pauses.install()
    freeze_startup_objects()
    return ServerState(config, loop, engine.tokenizer, metrics, engine.num_speculative_tokens, engine.platform.name,
                       gc_pauses)


async def shutdown(state: ServerState, grace_s: float) -> None:
    loop = state.loop
    loop.refuse_new()
    deadline = time.monotonic() + grace_s
    while loop.in_flight and loop.alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if loop.in_flight:
        logger.warning("shutting down: aborting %d unfinished sequences", loop.in_flight)
    await asyncio.to_thread(loop.stop)
    state.gc_pauses.uninstall()
    thaw()
