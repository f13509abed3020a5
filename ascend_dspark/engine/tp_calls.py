"""Tensor parallelism at the model runner: rank 0's runner (the driver) sends every call that
runs the device to the other ranks before running it itself (`sent_to_followers`); each
follower runs the same call on its own runner (`follow`) with the same block tables.
What crosses is what the runner reads (`portable`), and after each call every rank checks
that it committed the same tokens (`check_committed`): the ranks sample with the same
counter-based sampler on whole, all-gathered logits, so a difference is a bug, reported at
the step it happens.
"""

from __future__ import annotations

import functools

import torch

from .request import Request
from .scheduler import PrefillChunk


def sent_to_followers(method):
    """Tensor parallelism: on the driver (rank 0), hand the call to the other ranks before
    running it; a call made from inside another (time_step's verify) is not sent again."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.tp is None or not self.tp.is_driver or self._sending:
            return method(self, *args, **kwargs)
        self.tp.send_command((method.__name__, portable(args), kwargs))
        self.tp.broadcast_(self.tables.table)
        self._sending = True
        try:
            out = method(self, *args, **kwargs)
        finally:
            self._sending = False
        check_committed(self.tp, out)
        return out
    return run


def check_committed(tp, out) -> None:
    """The tokens a step committed are the same on every rank (TensorParallelGroup.check_same)."""
    if isinstance(out, dict):
        for name in ("first", "tokens"):
            if name in out:
                tp.check_same(f"the sampled tokens ({name})", out[name])


def portable(args: tuple) -> tuple:
    """A call's arguments as the other ranks need them: requests reduced to what the runner
    reads (slot, lengths, sampling parameters; the tokens only for a prefill), not their host
    bookkeeping. A field a follower lacks would change what it computes, which `check_same`
    reports at the step it happens."""
    def light(r: Request, tokens: bool = True) -> Request:
        return Request(r.request_id, r.prompt_ids if tokens else [], r.params, frozenset(), r.arrival,
                       output=r.output if tokens else [], slot=r.slot, num_cached=r.num_cached)

    def convert(a):
        if isinstance(a, list) and a and isinstance(a[0], Request):
            return [light(r, tokens=False) for r in a]
        if isinstance(a, list) and a and isinstance(a[0], PrefillChunk):
            return [PrefillChunk(light(c.request), c.start, c.end) for c in a]
        return a
    return tuple(convert(a) for a in args)


def follow(target, drafter, platform) -> None:
    """A tensor-parallel rank other than 0: build the runner rank 0 builds, then run every call
    rank 0's runner sends (same arguments, same block tables) until it says stop. Returns on
    "stop"; a dead rank 0 raises TensorParallelError (distributed/group.py)."""
    from .runner import ModelRunner        # the runner imports this module for sent_to_followers

    tp = target.tp
    runner = None
    while True:
        name, args, kwargs = tp.receive_command()
        if name == "stop":
            return
        if name == "__init__":
            runner = ModelRunner(target, drafter, platform, *args, **kwargs)
            continue
        tp.broadcast_(runner.tables.table)
        with torch.inference_mode():
            check_committed(tp, getattr(runner, name)(*args, **kwargs))
