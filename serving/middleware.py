"""Checks that run before a request reaches a route, as plain ASGI middleware so they cost
nothing on the streaming path and answer before the body is parsed.

- ApiKey: with a key configured, /v1/* (and the tokenizer routes) needs `Authorization: Bearer <key>`, compared in
  constant time (hmac.compare_digest) so response timing does not leak the key. /health,
  /metrics and /version stay open for probes and scrapers (as in vLLM).
- BodyLimit: a body over the limit is a 413 whether it declares its length or is chunked.
  The body is read (and dropped) to its end, up to a hard cap, before answering, so the
  client sees the 413 instead of a reset connection.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from .errors import APIError

DRAIN_FACTOR = 16          # read at most this many times the limit before giving up on a body


class ApiKey:
    def __init__(self, app, api_key: str | None, prefix: str | tuple[str, ...] = "/v1/") -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.prefix = prefix

    async def __call__(self, scope, receive, send) -> None:
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        err = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await JSONResponse(err.body(), err.status, err.headers)(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                too_big = True
            if too_big:
                if size > DRAIN_FACTOR * self.max_bytes:
                    break
                continue
            body.append(chunk)
        if too_big:
            err = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                           code="request_too_large")
            headers = {"Connection": "close"} if more else None
            return await JSONResponse(err.body(), err.status, headers)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()          # after the body: wait for the disconnect

        await self.app(scope, replay, send)
