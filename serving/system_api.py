"""Operational endpoints: /health (for probes and load balancers; 503 once the engine loop
is dead), /metrics (Prometheus text) and /version. They carry no API key, like vLLM's.

/health also reports the engine's accounting (sequences running and waiting, KV blocks
and slots in use, and whether an idle engine held anything it should have freed), so a
test or an operator can see leaks from outside the process.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = get_state(request)
    loop = state.loop
    snap = loop.snapshot
    engine = {**snap.__dict__, "in_flight": loop.in_flight, "accounting_ok": snap.accounting_error is None}
    if not loop.alive:
        return JSONResponse({"status": "unavailable", "message": "the engine loop has stopped; see the server log",
                             "engine": engine}, status_code=503)
    return JSONResponse({"status": "ok", "engine": engine})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def server_version(request: Request) -> dict:
    state = get_state(request)
    cfg = state.config
    return {"version": package_version(), "model": cfg.model_name, "drafter": cfg.drafter,
            "num_speculative_tokens": state.num_speculative_tokens, "device": state.device,
            "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs}


def package_version() -> str:
    try:
        return version("ascend-dspark")
    except PackageNotFoundError:
        from ascend_dspark import __version__

        return __version__
