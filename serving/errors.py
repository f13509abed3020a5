"""Every error leaves the server in OpenAI's shape,

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

so the official clients raise their typed exceptions (BadRequestError, RateLimitError, ...)
with our message. Handlers here cover our own errors, FastAPI's validation errors, HTTP
errors from routing (404 / 405) and anything unexpected, which becomes a plain 500: the
traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


_MEANINGS = {400: "invalid request: the message names the parameter", 401: "missing or invalid API key",
             404: "unknown model", 408: "the request ran past the server's time limit",
             413: "request body over the server's limit", 429: "the server is full; retry after Retry-After seconds",
             500: "unexpected server error (details only in the server log)",
             503: "the server is starting, stopping, or its engine has failed"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


def documented(*statuses: int) -> dict[int, dict]:
    """`responses=` for a route: these statuses answer with the error body (OpenAPI schema)."""
    return {s: {"model": ErrorResponse, "description": _MEANINGS[s]} for s in statuses}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return _json(APIError(status, message, param, code, headers))


def _json(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for the first pydantic error: what is wrong, and with which field."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc:
        return "the request body must be a JSON object (Content-Type: application/json)", None
    if first.get("type") == "extra_forbidden" and param:
        return f"unsupported parameter '{param}'", param
    if first.get("type") == "missing" and param:
        return f"missing required parameter '{param}'", param
    msg = first.get("msg", "invalid value")
    return (f"invalid value for '{param}': {msg}" if param else msg), param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _json(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return _json(APIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        return _json(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(APIError(500, "internal server error; see the server log"))
