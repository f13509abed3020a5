"""The `ascend-dspark` console script: ascend_dspark's commands (generate, doctor, regen,
train, eval) plus `serve`, the OpenAI-compatible server.

It lives here, above both packages, so that the engine never imports the server: the
parser and the error handling are ascend_dspark.cli's, this file only adds `serve`.
`python -m serving.cli` is the same command line without the installed script.
"""

from __future__ import annotations

import argparse
import os
import sys

from ascend_dspark import cli

from .config import add_arguments, from_args


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server "
                                                "(settings: flags or ASCEND_DSPARK_SERVE_* env)")
    add_arguments(serve)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    config = from_args(args).validate()          # a ConfigError (ValueError) is one clean error line
    import uvicorn

    from .factory import create_app, follow_as_rank

    if config.tensor_parallel_size > 1 and os.environ.get("RANK", "0") != "0":
        # Under torchrun every rank runs this command: rank 0 serves, the others follow it.
        # (Without torchrun the server starts the other ranks itself: factory.start_engine.)
        follow_as_rank(config)
        return 0
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=args.log_level,
                timeout_graceful_shutdown=config.shutdown_grace_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(cli.build_parser(add_serve_parser), argv)


if __name__ == "__main__":
    sys.exit(main())
