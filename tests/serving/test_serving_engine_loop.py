"""The engine loop in-process, over a scripted fake engine: the threading contract the server
relies on (one thread steps, idle means blocked, admission is all or nothing, capacity is
exact, a dead engine fails every waiter and turns /health to 503, an idle engine that still
holds blocks is reported). The loop sees the fake only through the Engine's public surface,
so a reach into engine internals fails here."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from ascend_dspark.engine.outputs import RequestStats
from ascend_dspark.engine.request import RequestDelta
from ascend_dspark.spec.sampling import SamplingParams
from serving.engine_loop import (
    EngineLoop,
    EngineUnavailable,
    QueueFull,
    Rejected,
    Sequence,
)
from serving.metrics import Metrics
from serving.system_api import health


class FakeEngine:
    """One token per step per request; `fail_at_step` raises inside step() like a device error."""

    def __init__(self, slots: int = 4, fail_at_step: int | None = None) -> None:
        self.requests: dict[str, list] = {}
        self.steps = 0
        self.unfinished_calls = 0
        self.fail_at_step = fail_at_step
        self.max_batch_size = slots
        self.num_free_slots = slots
        self.num_used_kv_blocks, self.num_kv_blocks = 0, 32
        self.failure = None             # set: broken while idle (a tensor-parallel rank died)

    def add_request(self, rid, prompt_ids, params):
        if not prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        self.requests[rid] = [params.max_tokens, 0, len(prompt_ids)]

    def has_unfinished(self):
        self.unfinished_calls += 1
        return bool(self.requests)

    @property
    def num_running(self):
        return len(self.requests)

    num_waiting = 0

    def step(self):
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("device lost")
        out = []
        for rid, r in list(self.requests.items()):
            r[1] += 1
            done = r[1] >= r[0]
            out.append(RequestDelta(rid, [7], "x", "length" if done else None, RequestStats(), r[2], r[1]))
            if done:
                del self.requests[rid]
        return out

    def abort(self, rid):
        r = self.requests.pop(rid, None)
        return None if r is None else RequestDelta(rid, [], "", "abort", RequestStats(), r[2], r[1])


# What serving may use of an Engine (ascend_dspark/engine/engine.py).
ENGINE_SURFACE = frozenset({
    "add_request", "abort", "step", "has_unfinished", "num_running", "num_waiting", "num_free_slots",
    "num_kv_blocks", "num_used_kv_blocks", "max_batch_size", "num_speculative_tokens", "tokenizer", "platform",
    "failure"})


class PublicSurface:
    """The engine as the loop may see it: any other attribute is an AttributeError (which
    kills the loop, so the test fails)."""

    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        if name not in ENGINE_SURFACE:
            raise AttributeError(f"serving reached Engine.{name}, outside the engine's public surface")
        return getattr(self._engine, name)


def _start(engine: FakeEngine, capacity: int = 4) -> EngineLoop:
    loop = EngineLoop(Metrics("fake"), capacity)
    loop.start(lambda: PublicSurface(engine))
    loop.wait_ready()
    return loop


def _seqs(name: str, *lengths: int, prompt=(1, 2)) -> list[Sequence]:
    return [Sequence(f"{name}-{i}", list(prompt), SamplingParams(max_tokens=n)) for i, n in enumerate(lengths)]


async def _drain(submission) -> list:
    return [(i, d.finish_reason) async for i, d in submission.deltas(time.monotonic() + 10)]


def test_requests_run_to_the_end_and_the_idle_loop_blocks():
    engine = FakeEngine()
    loop = _start(engine)

    async def main():
        sub = loop.submit(_seqs("a", 3, 5), time.monotonic())
        await sub.accepted()
        events = await _drain(sub)
        assert [e for e in events if e[1]] == [(0, "length"), (1, "length")]
        steps, calls = engine.steps, engine.unfinished_calls
        await asyncio.sleep(0.3)
        assert engine.steps == steps and engine.unfinished_calls <= calls + 1    # blocked, not spinning
        assert loop.in_flight == 0 and loop.snapshot.accounting_error is None

    asyncio.run(main())
    loop.stop()
    assert not loop.alive


def test_capacity_is_exact_and_frees_as_sequences_finish():
    engine = FakeEngine()
    loop = _start(engine, capacity=3)

    async def main():
        first = loop.submit(_seqs("a", 10**9, 10**9), time.monotonic())
        with pytest.raises(QueueFull):
            loop.submit(_seqs("b", 1, 1), time.monotonic())
        second = loop.submit(_seqs("c", 1), time.monotonic())
        await first.accepted()
        await second.accepted()
        await _drain(second)
        first.abort()
        assert [e for e in await _drain(first) if e[1]] == [(0, "abort"), (1, "abort")]
        await asyncio.sleep(0.05)
        assert loop.in_flight == 0 and not engine.requests
        loop.submit(_seqs("d", 1, 1, 1), time.monotonic())     # room again

    asyncio.run(main())
    loop.stop()


def test_a_refused_sequence_refuses_the_whole_request():
    engine = FakeEngine()
    loop = _start(engine)

    async def main():
        sub = loop.submit([*_seqs("a", 5), *_seqs("b", 5, prompt=())], time.monotonic())
        with pytest.raises(Rejected, match="empty prompt"):
            await sub.accepted()
        await asyncio.sleep(0.05)
        assert not engine.requests and loop.in_flight == 0

    asyncio.run(main())
    loop.stop()


def test_a_dead_engine_fails_every_waiter_and_health_says_503():
    engine = FakeEngine(fail_at_step=2)
    loop = _start(engine)
    state = SimpleNamespace(loop=loop)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(server=state)))

    async def main():
        sub = loop.submit(_seqs("a", 10), time.monotonic())
        await sub.accepted()
        with pytest.raises(EngineUnavailable):
            await _drain(sub)
        assert loop.in_flight == 0 and not loop.alive
        with pytest.raises(EngineUnavailable, match="device lost"):
            loop.submit(_seqs("b", 1), time.monotonic())
        response = await health(request)
        assert response.status_code == 503 and b"device lost" not in response.body

    asyncio.run(main())


def test_an_engine_broken_while_idle_turns_health_503_and_refuses_requests():
    """A tensor-parallel rank that dies while the server idles (the watchdog sets the engine's
    `failure`): /health says 503 at once, and a new request is refused, not queued."""
    engine = FakeEngine()
    loop = _start(engine)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(server=SimpleNamespace(loop=loop))))

    async def main():
        assert (await health(request)).status_code == 200
        engine.failure = "tensor-parallel rank 1 (pid 123) exited with code -9"
        assert (await health(request)).status_code == 503
        with pytest.raises(EngineUnavailable, match="rank 1"):
            loop.submit(_seqs("a", 1), time.monotonic())

    asyncio.run(main())
    loop.stop()


def test_stop_aborts_what_is_still_running():
    engine = FakeEngine()
    loop = _start(engine)

    async def main():
        sub = loop.submit(_seqs("a", 10**9), time.monotonic())
        await sub.accepted()
        await asyncio.to_thread(loop.stop)
        assert [e for e in await _drain(sub) if e[1]] == [(0, "abort")]
        with pytest.raises(EngineUnavailable, match="shutting down"):
            loop.submit(_seqs("b", 1), time.monotonic())

    asyncio.run(main())
    assert not engine.requests and loop.in_flight == 0


def test_an_idle_engine_that_still_holds_blocks_is_reported():
    engine = FakeEngine()
    loop = _start(engine)
    state = SimpleNamespace(loop=loop)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(server=state)))

    async def main():
        engine.num_used_kv_blocks = 3               # a leak: nothing runs, yet blocks are held
        sub = loop.submit(_seqs("a", 2), time.monotonic())
        await sub.accepted()
        await _drain(sub)
        await asyncio.sleep(0.05)
        assert loop.snapshot.accounting_error == "idle engine holds 3 blocks and 0 slots"
        body = json.loads((await health(request)).body)
        assert body["status"] == "ok" and body["engine"]["accounting_ok"] is False

    asyncio.run(main())
    loop.stop()
