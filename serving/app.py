"""`uvicorn serving.app:app`: the server configured from `ASCEND_DSPARK_SERVE_*` variables.

The settings are checked here, before uvicorn starts and before any model is loaded; a bad
one ends the process at once with exit code 2 and a message naming the variable (no
traceback). `ascend-dspark serve` builds the same app from flags (factory.create_app).
"""

from __future__ import annotations

import logging
import sys

from .config import ConfigError, ServerConfig


def _from_env():
    if not logging.getLogger().handlers:            # uvicorn configures only its own loggers
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("serving").setLevel(logging.INFO)
    try:
        config = ServerConfig.from_env().validate()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from .factory import create_app

    return create_app(config)


app = _from_env()
