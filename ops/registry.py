"""Which implementation of an op runs: chosen by the platform, logged once, overridable.

Every op has a plain-torch `reference` implementation (the spec). A platform names its
fast backend (`Platform.op_backend`: "triton" on CUDA, "npu" on Ascend, "reference" on
CPU). An op runs the platform's backend when its input lives on the platform's device and
the backend implements that op; otherwise the reference runs, and the choice is logged
once per (op, backend). `ASCEND_DSPARK_OPS=reference` forces the reference everywhere
(debugging, bisecting a numerical difference).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

import ascend_dspark.platform as _platform

logger = logging.getLogger("ops")

ENV_VAR = "ASCEND_DSPARK_OPS"
REFERENCE = "reference"

_impls: dict[str, dict[str, Callable]] = {}
_announced: set[tuple[str, str]] = set()
_backend_modules = {"triton": "ops.backends.triton", "npu": "ops.backends.npu"}
_loaded: dict[str, str | None] = {}            # backend -> None if loaded, else why not
_resolved: dict[tuple, Callable] = {}          # (op, device type, env override, platform) -> impl


def register(op: str, backend: str = REFERENCE) -> Callable[[Callable], Callable]:
    """Decorator: `fn` implements `op` for `backend`."""
    def wrap(fn: Callable) -> Callable:
        _impls.setdefault(op, {})[backend] = fn
        return fn
    return wrap


def _load_backend(backend: str) -> str | None:
    """Import a backend's module once; return None on success, else the reason."""
    if backend not in _loaded:
        try:
            __import__(_backend_modules[backend])
            _loaded[backend] = None
        except (ImportError, OSError, RuntimeError) as exc:
            _loaded[backend] = f"{type(exc).__name__}: {exc}"
            logger.warning("ops: %s backend unavailable (%s); using the reference ops", backend, _loaded[backend])
    return _loaded[backend]


def wanted_backend(device: torch.device) -> str:
    """The backend the current platform asks for on tensors of `device`."""
    if os.environ.get(ENV_VAR, "").lower() == REFERENCE:
        return REFERENCE
    platform = _platform.current_platform()
    if platform.op_backend == REFERENCE or device.type != platform.device.type:
        return REFERENCE
    return platform.op_backend


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of `op` to run on tensors of `device`, memoised: eager decoding is
    launch-bound, and this runs for every op call (a few hundred per step)."""
    key = (op, device.type, os.environ.get(ENV_VAR), _platform._current)   # the object, not id(): ids get reused
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _resolve(op, device)
    return fn


def _resolve(op: str, device: torch.device) -> Callable:
    backend = wanted_backend(device)
    impls = _impls[op]
    if backend != REFERENCE and (_load_backend(backend) is not None or backend not in impls):
        backend = REFERENCE
    if (op, backend) not in _announced:
        _announced.add((op, backend))
        logger.info("ops: %s -> %s", op, backend)
    return impls[backend]


def chosen() -> dict[str, str]:
    """op -> backend for every choice made so far (for `doctor` and tests)."""
    return dict(sorted(_announced))


def dispatching(op: str) -> Callable[[Callable], Callable]:
    """Decorator for an op's public entry point: registers the body as the reference and
    routes each call through `resolve` on the device of the first tensor argument."""
    def wrap(reference: Callable) -> Callable:
        register(op)(reference)

        def entry(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()))
            return resolve(op, first.device)(*args, **kwargs)

        entry.__name__, entry.__qualname__, entry.__doc__ = reference.__name__, reference.__qualname__, reference.__doc__
        entry.reference = reference
        return entry
    return wrap


def _reset_for_tests(*backends: str) -> None:
    """Tests only: forget the choices made so far and unload `backends` (default: all), so
    the next op call re-imports them against whatever `torch_npu` / platform is current.
    A backend's companion modules (`ops.backends.npu_sampling`, `ops.backends.triton_kernels.*`:
    names extending the backend module's) are unloaded too, since they register on import."""
    import sys

    _announced.clear()
    _resolved.clear()
    for backend in backends or tuple(_backend_modules):
        _loaded.pop(backend, None)
        for impls in _impls.values():
            impls.pop(backend, None)
        module = _backend_modules[backend]
        for loaded in [m for m in sys.modules if m == module or m.startswith((module + "_", module + "."))]:
            del sys.modules[loaded]
            parent, _, name = loaded.rpartition(".")
            if parent in sys.modules and name in vars(sys.modules[parent]):
                delattr(sys.modules[parent], name)
