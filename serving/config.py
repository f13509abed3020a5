"""Server settings: one dataclass, filled from `ASCEND_DSPARK_SERVE_*` environment variables
(`uvicorn serving.app:app`) or from `ascend-dspark serve` flags, and checked before any model
is loaded, so a typo fails in a second with a message naming the variable instead of after
a model load or, worse, on the first request.

Every field has one environment variable: `ASCEND_DSPARK_SERVE_` + the field name in upper
case (`max_num_seqs` -> `ASCEND_DSPARK_SERVE_MAX_NUM_SEQS`). serving/README.md lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_PREFIX = "ASCEND_DSPARK_SERVE_"
LOOPBACK = "127.0.0.1"


class ConfigError(ValueError):
    """A setting that cannot work; the message names the variable / flag and what is allowed."""


@dataclass
class ServerConfig:
    # what to serve (the defaults: the embedded SmolLM2 and its shipped DSpark draft)
    model: str = "default"
    drafter: str = "dspark"
    num_speculative_tokens: int = 7
    speculation: str = "confidence"        # "confidence": each step's depth planned for tokens/s; "fixed": always K
    device: str | None = None              # None: detect (NPU > CUDA > CPU) or ASCEND_DSPARK_DEVICE
    dtype: str | None = None               # None: the device's default
    served_model_name: str | None = None   # the `model` names clients send (comma-separated aliases); None: `model`
    seed: int = 0                          # initialises a drafter that has no checkpoint
    tensor_parallel_size: int = 1          # ranks the target is sharded over (README "Tensor parallelism")
    # capacity
    max_num_seqs: int = 8                  # sequences decoded at once (engine slots)
    max_model_len: int = 2048              # prompt + output tokens of one sequence
    decode_steps_per_launch: int | None = None   # plain decode steps per launch (None: the engine default, 1)
    prefill_graphs: bool | None = None     # prompt chunks replayed from graphs (None: the engine default, on)
    queue_size: int = 64                   # sequences waiting for a slot before 429s start
    max_n: int = 16                        # largest `n` (choices per request) accepted
    request_timeout_s: float = 600.0       # a request still running after this is aborted
    shutdown_grace_s: float = 30.0         # on shutdown, in-flight requests get this long to finish
    # exposure
    host: str = LOOPBACK
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 1 << 20

    @property
    def model_names(self) -> list[str]:
        """Every name a request may give as `model` (vLLM's `--served-model-name a b`): the
        first is the primary one (metrics, logs)."""
        names = [n.strip() for n in (self.served_model_name or "").split(",") if n.strip()]
        return names or [self.model]

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def capacity(self) -> int:
        """Sequences admitted at once: running plus waiting."""
        return self.max_num_seqs + self.queue_size

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> ServerConfig:
        """Defaults, then `ASCEND_DSPARK_SERVE_*` variables, then `overrides` (flags; None
        means "not given"). Raises ConfigError for a value of the wrong type."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = env_name(f.name)
            raw = environ.get(name)
            if raw is not None and raw.strip() != "":
                values[f.name] = _convert(f, raw.strip(), name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> ServerConfig:
        """Check everything that can be checked without loading a model; raise ConfigError
        listing every problem at once."""
        problems = []

        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                problems.append(f"{env_name(name)} (--{name.replace('_', '-')}): {message}")

        for name in ("max_num_seqs", "max_n", "port", "max_body_bytes", "num_speculative_tokens",
                     "tensor_parallel_size"):
            need(getattr(self, name) >= 1 if name != "port" else 0 <= self.port <= 65535, name,
                 f"must be {'in 0..65535' if name == 'port' else '>= 1'}, got {getattr(self, name)}")
        need(self.max_model_len >= 2, "max_model_len", f"must be >= 2, got {self.max_model_len}")
        need(self.decode_steps_per_launch is None or self.decode_steps_per_launch >= 1, "decode_steps_per_launch",
             f"must be >= 1, got {self.decode_steps_per_launch}")
        need(self.queue_size >= 0, "queue_size", f"must be >= 0, got {self.queue_size}")
        need(self.request_timeout_s > 0, "request_timeout_s", f"must be > 0, got {self.request_timeout_s}")
        need(self.shutdown_grace_s >= 0, "shutdown_grace_s", f"must be >= 0, got {self.shutdown_grace_s}")
        need(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        need(self.api_key is None or len(self.api_key) >= 8, "api_key", "must be at least 8 characters")
        need(bool(self.host.strip()), "host", "must not be empty")

        from ascend_dspark.engine.engine import SPECULATION_POLICIES
        from ascend_dspark.engine.llm import DRAFTER_KINDS, DTYPES
        from ascend_dspark.models.loader import DEFAULT_NAMES

        need(self.model.lower() in DEFAULT_NAMES or Path(self.model).expanduser().exists(), "model",
             f"{self.model!r} is neither {' / '.join(DEFAULT_NAMES)} nor an existing model directory or .gguf file")
        need(self.drafter in DRAFTER_KINDS or Path(self.drafter).expanduser().exists(), "drafter",
             f"{self.drafter!r} is neither one of {', '.join(DRAFTER_KINDS)} nor an existing checkpoint directory")
        need(self.speculation in SPECULATION_POLICIES, "speculation",
             f"{self.speculation!r} is not one of {', '.join(SPECULATION_POLICIES)}")
        need(self.dtype is None or self.dtype in DTYPES, "dtype",
             f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        device_problem = _device_problem(self.device)
        need(device_problem is None, "device", device_problem or "")
        if problems:
            raise ConfigError("invalid server configuration:\n  " + "\n  ".join(problems))
        if not _is_loopback(self.host) and self.api_key is None:
            logger.warning("serving on %s without an API key: anyone who can reach this address can use "
                           "the model (set %s)", self.host, env_name("api_key"))
        return self


_HELP = {
    "tensor_parallel_size": "shard the target over N ranks of this host; without torchrun the server starts "
                            "ranks 1..N-1 itself",
    "model": "'default' (SmolLM2-135M-Instruct), an HF model directory or a .gguf file",
    "drafter": "none | eagle3 | dflash | dspark | a checkpoint directory",
    "speculation": "confidence (each step's draft depth, 0 to K, chosen from predicted acceptance and the "
                   "measured step cost) | fixed (always K)",
    "device": "cpu | cuda[:N] | npu[:N] (default: detect NPU > CUDA > CPU)",
    "dtype": "float32 | bfloat16 | float16 (default: the device's)",
    "served_model_name": "the model names clients may send, aliases all served alike: "
                         "--served-model-name a b, or a,b in the environment (default: the value of --model)",
    "max_num_seqs": "sequences decoded at once",
    "decode_steps_per_launch": "plain decode steps one launch may carry while no request can join or finish by "
                               "length (default 1: one step per launch)",
    "prefill_graphs": "replay prompt chunks from captured graphs where the device has graphs "
                      "(default: on where the device has step graphs; --no-prefill-graphs: eager prefills)",
    "queue_size": "sequences waiting for a slot before requests get 429",
    "max_n": "largest n (choices per request)",
    "host": "address to bind; anything but loopback exposes the server",
    "api_key": "require 'Authorization: Bearer KEY' on /v1 (prefer the environment variable)",
}


_LISTS = ("served_model_name",)     # flags that take several values (kept comma-joined in the config)


def add_arguments(parser) -> None:
    """One flag per setting (`--max-num-seqs` for `max_num_seqs`); unset flags fall back to
    the environment, then to the defaults."""
    for f in fields(ServerConfig):
        kind = f.type if isinstance(f.type, str) else str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = _HELP.get(f.name, f.name.replace("_", " "))
        shown = "" if f.name == "api_key" or default is None else f"; default {default}"
        if kind.startswith("bool"):       # --flag / --no-flag
            kwargs = {"action": argparse.BooleanOptionalAction}
        else:
            kwargs = {"type": int if kind.startswith("int") else float if kind.startswith("float") else str}
            if f.name in _LISTS:
                kwargs["nargs"] = "+"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"{help_} (env {env_name(f.name)}{shown})", **kwargs)


def from_args(args, environ: Mapping[str, str] | None = None) -> ServerConfig:
    values = {f.name: getattr(args, f.name, None) for f in fields(ServerConfig)}
    for name in _LISTS:
        if isinstance(values.get(name), list):
            values[name] = ",".join(values[name])
    return ServerConfig.from_env(environ, **values)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(f: dataclasses.Field, raw: str, name: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("bool"):
        value = _BOOLEANS.get(raw.lower())
        if value is None:
            raise ConfigError(f"{name} must be one of {', '.join(_BOOLEANS)}, got {raw!r}")
        return value
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {'an integer' if kind.startswith('int') else 'a number'}, "
                          f"got {raw!r}") from None
    return raw


def _device_problem(device: str | None) -> str | None:
    if device is None:
        return None
    from ascend_dspark.platform import make_platform

    try:
        make_platform(device)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
