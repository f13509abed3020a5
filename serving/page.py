"""The built-in page: GET / serves `static/index.html`, GET /static/<name> its script and
style sheet. Plain files, no build step and nothing fetched from elsewhere (the machines
are offline): the page talks to this server's own API only, which its Content-Security-
Policy enforces.

The page streams a chat from /v1/chat/completions (server-sent events parsed in its
script), and polls /speculation for the live picture: mean accepted length, conditional
acceptance per draft position (a bar chart drawn on a <canvas>) and tokens per second.
With an API key configured the user pastes it into the page, which keeps it in memory
only (never in storage, cookies or the URL); the page itself and /speculation are open,
like /health and /metrics.

Only the files listed in STATIC are served (no path from the request reaches the file
system), and none of them is part of the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from .errors import APIError

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    if name not in STATIC:
        raise APIError(404, f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=STATIC[name], headers=HEADERS)
