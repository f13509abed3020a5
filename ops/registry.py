"""Which implementation of an op runs: chosen by a registry the platform hands down.

Every op has a plain-torch `reference` implementation (the spec). Backends register faster
ones under their name when their module is imported ("triton" for CUDA tensors, "npu" for
Ascend's). An `OpRegistry` is one platform's choice: tensors of its device type run its
backend where the backend implements the op, everything else runs the reference, and the
choice is logged once per (registry, op). `ASCEND_DSPARK_OPS=reference` forces the
reference everywhere (debugging, bisecting a numerical difference);
`ASCEND_DSPARK_OPS=reference:linear,attention` only for the ops named. It is read at every
call, so it can be set around one run. `OpRegistry.force_reference(op, why)` does the
same for one registry (a kernel that failed its platform's self-test).

Who picks the registry: the platform (`Platform.ops`), handed to the models through the
forward context (`ForwardContext.ops`) and to sampling through `SamplingBatch`. The module
functions (`ops.rms_norm(...)`) run on `DEVICE_DEFAULTS`: each device type's own backend
(CUDA -> triton, NPU -> npu), for callers no platform speaks for.

    registry.rms_norm(x, w, eps)     the op as this registry resolves it
    registry.resolve("rms_norm", x.device)
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import torch

logger = logging.getLogger("ops")

ENV_VAR = "ASCEND_DSPARK_OPS"
REFERENCE = "reference"
BACKEND_MODULES = {"triton": "ops.backends.triton", "npu": "ops.backends.npu"}
DEVICE_BACKENDS = {"cuda": "triton", "npu": "npu"}      # a device type's backend when no platform says

IMPLS: dict[str, dict[str, Callable]] = {}      # op -> backend -> implementation (filled at import)
ENTRIES: dict[str, str] = {}                    # public function name -> op (e.g. apply_min_p -> min_p)


def register(op: str, backend: str = REFERENCE) -> Callable[[Callable], Callable]:
    """Decorator: `fn` implements `op` for `backend`."""
    def wrap(fn: Callable) -> Callable:
        IMPLS.setdefault(op, {})[backend] = fn
        return fn
    return wrap


class OpRegistry:
    """One platform's op choice: tensors on `device_type` run `backend`, others the reference.
    `device_type=None`: every device type runs its own backend (DEVICE_BACKENDS)."""

    def __init__(self, device_type: str | None, backend: str = REFERENCE) -> None:
        self.device_type = device_type
        self.backend = backend
        self._resolved: dict[tuple[str, str, str | None], Callable] = {}
        self._chosen: dict[str, str] = {}
        self._unavailable: dict[str, str | None] = {}         # backend -> why it cannot load (None: loaded)
        self._forced: dict[str, str] = {}                     # op -> why it runs the reference (force_reference)

    def resolve(self, op: str, device: torch.device) -> Callable:
        """The implementation of `op` for tensors of `device`, memoised: eager decoding is
        launch-bound, and this runs for every op call (a few hundred per step)."""
        key = (op, device.type, os.environ.get(ENV_VAR))
        fn = self._resolved.get(key)
        if fn is None:
            fn = self._resolved[key] = self._choose(op, device.type, forces_reference(key[2], op))
        return fn

    def _choose(self, op: str, device_type: str, forced_reference: bool) -> Callable:
        impls = IMPLS[op]
        if self.device_type is None:
            backend = DEVICE_BACKENDS.get(device_type, REFERENCE)
        else:
            backend = self.backend if device_type == self.device_type else REFERENCE
        forced_reference = forced_reference or op in self._forced
        if forced_reference or (backend != REFERENCE and (not self._loads(backend) or backend not in impls)):
            backend = REFERENCE
        if self._chosen.get(op) != backend:
            logger.info("ops: %s -> %s", op, backend)
        self._chosen[op] = backend
        return impls[backend]

    def _loads(self, backend: str) -> bool:
        """Import a backend's module once per registry; a failure is logged once and the
        reference runs instead."""
        if backend not in self._unavailable:
            try:
                importlib.import_module(BACKEND_MODULES[backend])
                self._unavailable[backend] = None
            except (ImportError, OSError, RuntimeError) as exc:
                self._unavailable[backend] = f"{type(exc).__name__}: {exc}"
                logger.warning("ops: %s backend unavailable (%s); using the reference ops",
                               backend, self._unavailable[backend])
        return self._unavailable[backend] is None

    def force_reference(self, op: str, why: str) -> None:
        """Run `op`'s reference on this registry from now on, e.g. a kernel that failed the
        platform's self-test; logged once, shown by `chosen()` and `forced()`."""
        if op not in IMPLS:
            raise KeyError(f"no op named {op!r}")
        if op not in self._forced:                 # the first reason stays: it is the cause
            logger.warning("ops: %s -> reference on this platform: %s", op, why)
            self._forced[op] = why
        self._resolved = {key: fn for key, fn in self._resolved.items() if key[0] != op}
        self._chosen[op] = REFERENCE

    def forced(self) -> dict[str, str]:
        """op -> why `force_reference` sent it to the reference."""
        return dict(self._forced)

    def chosen(self) -> dict[str, str]:
        """op -> backend for every op this registry has resolved (for `doctor` and tests)."""
        return dict(sorted(self._chosen.items()))

    def __getattr__(self, name: str) -> Callable:
        """`registry.rms_norm(x, ...)`: the public op `name`, dispatched by this registry."""
        op = ENTRIES.get(name)
        if op is None:
            raise AttributeError(f"no op named {name!r} (ops: {', '.join(sorted(ENTRIES))})")

        def call(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()))
            return self.resolve(op, first.device)(*args, **kwargs)

        call.__name__ = name
        setattr(self, name, call)          # found directly from now on: this runs per op call
        return call

    def __repr__(self) -> str:
        return f"OpRegistry({self.device_type!r}, {self.backend!r})"


DEVICE_DEFAULTS = OpRegistry(None)


def forces_reference(setting: str | None, op: str) -> bool:
    """Whether ASCEND_DSPARK_OPS=`setting` sends `op` to its reference: "reference" (every
    op) or "reference:op1,op2" (those named)."""
    kind, _, names = (setting or "").lower().partition(":")
    return kind.strip() == REFERENCE and (not names or op in {n.strip() for n in names.split(",")})


def dispatching(op: str) -> Callable[[Callable], Callable]:
    """Decorator for an op's public entry point: registers the body as the reference and
    routes each call through DEVICE_DEFAULTS, by the first tensor argument's device."""
    def wrap(reference: Callable) -> Callable:
        register(op)(reference)
        ENTRIES[reference.__name__] = op

        def entry(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()))
            return DEVICE_DEFAULTS.resolve(op, first.device)(*args, **kwargs)

        entry.__name__, entry.__qualname__, entry.__doc__ = reference.__name__, reference.__qualname__, reference.__doc__
        entry.reference = reference
        return entry
    return wrap
