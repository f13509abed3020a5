"""What the routes share: the settings, the engine loop, the tokenizer and the metrics of
one running server, kept on `app.state.server` by the lifespan in `factory.py`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from .config import ServerConfig
from .engine_loop import EngineLoop
from .errors import APIError
from .gc_pauses import GcPauses
from .metrics import Metrics


@dataclass
class ServerState:
    config: ServerConfig
    loop: EngineLoop
    tokenizer: object                # ascend_dspark.models.tokenizer.Tokenizer
    metrics: Metrics
    num_speculative_tokens: int      # what the engine verifies per step (0: no drafter)
    device: str
    gc_pauses: GcPauses              # timing the cyclic GC's collections while the server runs
    started: int = field(default_factory=lambda: int(time.time()))
    grammars: object | None = None   # spec.grammar.GrammarCompiler, built on the first structured request


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "server", None)
    if state is None:
        raise APIError(503, "the server is starting or stopping")
    return state
