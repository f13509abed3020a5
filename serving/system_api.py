"""Operational endpoints: /health (for probes and load balancers; 503 once the engine loop
is dead), /metrics (Prometheus text), /speculation (the same counters as JSON, plus the
conditional acceptance per draft position and the recent generation rate: what the built-in
page charts) and /version. They carry no API key, like vLLM's.

/health also reports the engine's accounting (sequences running and waiting, KV blocks
and slots in use, and whether an idle engine held anything it should have freed), so a
test or an operator can see leaks from outside the process.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from .errors import ErrorResponse, documented
from .state import get_state

router = APIRouter(responses=documented(503))


class EngineAccounting(BaseModel):
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    free_slots: int
    slots_total: int
    accounting_error: str | None = Field(description="set when an idle engine still held blocks or slots")
    in_flight: int = Field(description="sequences admitted by the server and not finished")
    accounting_ok: bool


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    message: str | None = None
    engine: EngineAccounting


class VersionResponse(BaseModel):
    version: str
    model: str
    drafter: str
    num_speculative_tokens: int
    device: str
    max_model_len: int
    max_num_seqs: int


@router.get("/health", response_model=HealthResponse, responses={503: {
    "model": HealthResponse | ErrorResponse,
    "description": "the engine loop has stopped (the body says so), or the server is starting or stopping"}})
async def health(request: Request) -> JSONResponse:
    state = get_state(request)
    loop = state.loop
    snap = loop.snapshot
    engine = {**snap.__dict__, "in_flight": loop.in_flight, "accounting_ok": snap.accounting_error is None}
    if not loop.alive:
        return JSONResponse({"status": "unavailable", "message": "the engine loop has stopped; see the server log",
                             "engine": engine}, status_code=503)
    return JSONResponse({"status": "ok", "engine": engine})


@router.get("/metrics", response_class=PlainTextResponse, responses={
    200: {"description": "Prometheus text format"},
    503: {"description": "the server is starting or stopping",       # an error body, not metrics text
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}})
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


class ConfidenceCalibration(BaseModel):
    count: int = Field(description="reached draft positions in the window (0: no confidence head, or nothing yet)")
    ece: float | None = Field(description="expected calibration error, 20 equal-width bins")
    auroc: float | None = Field(description="how well c_k ranks accepted above rejected drafts (0.5: not at all)")
    brier: float | None = Field(description="mean squared error of c_k as a probability of acceptance")


class SpeculationTotalsResponse(BaseModel):
    """Speculation of every request since the server started (all choices, all requests)."""

    model: str
    drafter: str
    num_speculative_tokens: int = Field(description="K: draft tokens the engine verifies per step (0: no drafter)")
    num_verify_steps: int = Field(description="decode steps (target forwards), speculating or not")
    num_drafts: int = Field(description="verify steps that checked at least one draft token")
    num_draft_tokens: int
    num_accepted_tokens: int
    mean_accepted_length: float = Field(description="tokens committed per verify step, the bonus token included")
    acceptance_per_position: list[float] = Field(
        description="conditional acceptance of draft position k: accepted / reached (reached: every earlier draft accepted)")
    position_reached: list[int]
    position_accepted: list[int]
    verify_length_counts: list[int] = Field(
        description="request-steps by the drafts they verified, 0..K (the depths the speculation policy chose)")
    confidence_calibration: ConfidenceCalibration = Field(
        description="the confidence head's c_k against acceptance at the most recent reached draft positions")
    step_costs: dict | None = Field(
        default=None, description="the confidence policy's step costs: profiled at start-up and measured on the steps "
                                  "run, in ms per (batch size, depth); null under the fixed policy or before the engine is up")
    drafter_sleeps: int | None = Field(
        default=None, description="times the confidence policy's drafter fell asleep since start (every request then "
                                  "running decodes plainly to its end); null under the fixed policy")
    generation_tokens: int = Field(description="tokens generated since start")
    tokens_per_second: float = Field(description="tokens generated over the last window_s seconds, per second")
    window_s: float
    running: int = Field(description="sequences decoding now")
    waiting: int = Field(description="sequences queued for a slot")
    uptime_s: float


@router.get("/speculation", response_model=SpeculationTotalsResponse)
async def speculation(request: Request) -> SpeculationTotalsResponse:
    state = get_state(request)
    snap = state.loop.snapshot
    return SpeculationTotalsResponse(
        model=state.config.model_name, drafter=state.config.drafter, num_speculative_tokens=state.num_speculative_tokens,
        running=snap.running, waiting=snap.waiting, uptime_s=round(time.time() - state.started, 3),
        **state.metrics.totals.snapshot(state.num_speculative_tokens),
        confidence_calibration=state.metrics.totals.calibration(), step_costs=_step_costs(state),
        drafter_sleeps=_drafter_sleeps(state))


def _step_costs(state) -> dict | None:
    engine = state.loop.engine
    costs = getattr(engine, "costs", None) if engine is not None else None
    return costs.table() if costs is not None else None


def _drafter_sleeps(state) -> int | None:
    engine = state.loop.engine
    return engine.drafter_sleeps if engine is not None and engine.speculation == "confidence" else None


@router.get("/version", response_model=VersionResponse)
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
