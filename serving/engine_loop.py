"""The one thread that owns the engine, and the asyncio side of each request it serves.

The engine is not thread-safe and holds the device, so exactly one thread (the loop) calls
add_request / step / abort. HTTP handlers run on the asyncio event loop and talk to it
only through a command queue (add a submission, abort one, stop); the loop applies the
commands between steps, so requests join and leave the running batch at step boundaries.
When nothing is running it blocks on the command queue instead of spinning.

Results travel back as events on one asyncio.Queue per submission (one HTTP request,
holding its `n` sequences), posted with `call_soon_threadsafe` once per step for all
submissions together.

Back-pressure is decided before anything reaches the thread: `submit` counts the
sequences admitted and not yet finished, and refuses (QueueFull -> HTTP 429) past
`capacity` (slots + queue), so a flood costs the loop nothing.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ascend_dspark.engine.request import RequestDelta
from ascend_dspark.spec.sampling import SamplingParams

from .metrics import Metrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every slot and queue place is taken; retry later."""


class EngineUnavailable(Exception):
    """The loop is stopping or has died; the message says which."""


class TimedOut(Exception):
    """The request ran past its deadline and was aborted."""


class Rejected(Exception):
    """The engine refused the request (bad prompt, too long, cannot fit); the message is for the user."""


@dataclass
class Sequence:
    """One engine request: one choice of one prompt."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine accounting as the loop thread last saw it (read by /health, never by the engine)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    free_slots: int = 0
    slots_total: int = 0
    accounting_error: str | None = None     # set if an idle engine still held blocks or slots


class Submission:
    """The asyncio end of one HTTP request: its sequences, and the events the loop sends."""

    def __init__(self, loop: EngineLoop, sequences: list[Sequence], arrival: float) -> None:
        self.loop = loop
        self.sequences = sequences
        self.arrival = arrival
        self.aloop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.unfinished = len(sequences)
        self.aborted = False

    def post(self, events: list[tuple]) -> None:          # on the event loop
        for event in events:
            self.events.put_nowait(event)

    async def accepted(self) -> None:
        """Wait until the loop has added every sequence (all or none)."""
        kind, payload = await self.events.get()
        if kind == "rejected":
            raise Rejected(payload)
        if kind == "failed":
            raise EngineUnavailable(payload)
        assert kind == "accepted", kind

    async def deltas(self, deadline: float) -> AsyncIterator[tuple[int, RequestDelta]]:
        """(choice index, delta) until every sequence has finished; past `deadline`
        (time.monotonic()) the rest is aborted and TimedOut raised."""
        while self.unfinished:
            try:
                kind, payload = await asyncio.wait_for(self.events.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.abort()
                raise TimedOut() from None
            if kind == "failed":
                raise EngineUnavailable(payload)
            index, delta = payload
            if delta.finished:
                self.unfinished -= 1
            yield index, delta

    def abort(self) -> None:
        """Stop whatever is still running (client gone, timeout); idempotent, never blocks."""
        if self.unfinished and not self.aborted:
            self.aborted = True
            self.loop.abort(self)


@dataclass
class _Tracked:
    """Loop-thread bookkeeping of one sequence in the engine."""

    submission: Submission
    index: int
    first_token_at: float | None = None
    steps_seen: int = 0


class EngineLoop:
    """Owns the engine from construction on: `start(build)` runs `build()` on the loop
    thread itself, so whatever the device keeps per thread (current device, streams, graph
    pools) belongs to the thread that later steps."""

    def __init__(self, metrics: Metrics, capacity: int) -> None:
        self.engine = None
        self.metrics = metrics
        self.capacity = capacity
        self.snapshot = EngineSnapshot()
        self.error: str | None = None                # why the loop died
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0                          # sequences admitted, not finished
        self._stopping = False
        self._tracked: dict[str, _Tracked] = {}      # loop thread only
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- called from the event loop -------------------------------------------------------------
    def start(self, build: Callable[[], object]) -> None:
        """Start the thread; it builds the engine with `build()`, then serves."""
        self._thread = threading.Thread(target=self._main, args=(build,), name="engine-loop", daemon=True)
        self._thread.start()

    def wait_ready(self) -> None:
        """Block until the engine is built; re-raise what building it raised."""
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    @property
    def alive(self) -> bool:
        engine_failed = self.engine is not None and self.engine.failure is not None
        return self._thread is not None and self._thread.is_alive() and self.error is None and not engine_failed

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, sequences: list[Sequence], arrival: float) -> Submission:
        """Admit a request's sequences or refuse at once (QueueFull, EngineUnavailable)."""
        with self._lock:
            failure = self.engine.failure if self.engine is not None else None
            if self.error is not None or failure is not None:
                raise EngineUnavailable(f"the engine stopped after an error: {self.error or failure}")
            if self._stopping:
                raise EngineUnavailable("the server is shutting down")
            if self._in_flight + len(sequences) > self.capacity:
                raise QueueFull(f"the server is at capacity ({self.capacity} sequences running or queued)")
            self._in_flight += len(sequences)
            self.metrics.in_flight.set(self._in_flight)
            submission = Submission(self, sequences, arrival)
            # Queued under the lock: a loop that dies after this sees the command when it
            # drains the queue, and one that died before made the check above fail.
            self._commands.put(("add", submission))
        return submission

    def abort(self, submission: Submission) -> None:
        self._commands.put(("abort", submission))

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever still runs and end the thread (blocks: call it off the event loop)."""
        with self._lock:
            self._stopping = True
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def refuse_new(self) -> None:
        """Graceful shutdown: from now on submit() answers EngineUnavailable."""
        with self._lock:
            self._stopping = True

    # -- the loop thread ------------------------------------------------------------------------
    def _main(self, build: Callable[[], object]) -> None:
        try:
            self.engine = build()
            self._publish_snapshot()
            self.metrics.engine_alive.set(1)
        except BaseException as exc:
            self._build_error = exc
            self.error = "the engine could not be built"
            return
        finally:
            self._ready.set()
        self._run()

    def _run(self) -> None:
        outbox: dict[Submission, list[tuple]] = {}
        try:
            while True:
                idle = not self.engine.has_unfinished()
                if idle:
                    self._check_idle()
                commands = [self._commands.get()] if idle else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for kind, submission in commands:
                    if kind == "stop":
                        self._abort_all(outbox)
                        return
                    (self._add if kind == "add" else self._abort)(submission, outbox)
                if self.engine.has_unfinished():
                    deltas = self.engine.step()
                    now = time.monotonic()
                    for delta in deltas:
                        self._handle(delta, now, outbox)
                self._publish_snapshot()
                self._flush(outbox)
        except BaseException as exc:                 # the engine is unusable now: fail everything
            logger.exception("engine loop died")
            self._fail_everything(f"{type(exc).__name__}: {exc}", outbox)
        finally:
            self._flush(outbox)

    def _fail_everything(self, error: str, outbox) -> None:
        with self._lock:
            self.error = error
        self.metrics.engine_alive.set(0)
        message = "the engine failed; see the server log"
        failed = {t.submission for t in self._tracked.values()}
        self._release(len(self._tracked))
        self._tracked.clear()
        while True:                                   # adds that will never be applied now
            try:
                kind, submission = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._release(len(submission.sequences))
                failed.add(submission)
        for submission in failed:
            outbox.setdefault(submission, []).append(("failed", message))

    def _add(self, submission: Submission, outbox) -> None:
        added = []
        try:
            for seq in submission.sequences:
                self.engine.add_request(seq.request_id, seq.prompt_ids, seq.params)
                added.append(seq.request_id)
        except ValueError as exc:                     # all or nothing
            for rid in added:
                self.engine.abort(rid)
            self._release(len(submission.sequences))
            outbox.setdefault(submission, []).append(("rejected", str(exc)))
            return
        for index, seq in enumerate(submission.sequences):
            self._tracked[seq.request_id] = _Tracked(submission, index)
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        outbox.setdefault(submission, []).append(("accepted", None))

    def _abort(self, submission: Submission, outbox) -> None:
        for seq in submission.sequences:
            if seq.request_id in self._tracked:
                delta = self.engine.abort(seq.request_id)
                if delta is not None:
                    self._handle(delta, time.monotonic(), outbox)

    def _abort_all(self, outbox) -> None:
        for rid in list(self._tracked):
            delta = self.engine.abort(rid)
            if delta is not None:
                self._handle(delta, time.monotonic(), outbox)
        self._publish_snapshot()

    def _handle(self, delta: RequestDelta, now: float, outbox) -> None:
        t = self._tracked.get(delta.request_id)
        if t is None:
            return
        m = self.metrics
        if delta.new_token_ids:
            m.generated(len(delta.new_token_ids), now)
            if t.first_token_at is None:
                t.first_token_at = now
                m.ttft.observe(now - t.submission.arrival)
        m.record_spec_steps(delta.stats, t.steps_seen)
        t.steps_seen = delta.stats.num_steps
        outbox.setdefault(t.submission, []).append(("delta", (t.index, delta)))
        if delta.finished:
            del self._tracked[delta.request_id]
            self._release(1)
            m.finished(delta.finish_reason)
            m.e2e.observe(now - t.submission.arrival)
            if t.first_token_at is not None and delta.num_output_tokens > 1:
                m.tpot.observe((now - t.first_token_at) / (delta.num_output_tokens - 1))

    def _release(self, n: int) -> None:
        with self._lock:
            self._in_flight -= n
            self.metrics.in_flight.set(self._in_flight)

    def _flush(self, outbox: dict[Submission, list[tuple]]) -> None:
        """Hand this step's events to the event loop(s) in one call each."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for submission, events in outbox.items():
            by_loop.setdefault(submission.aloop, []).append((submission, events))
        outbox.clear()
        for aloop, batch in by_loop.items():
            try:
                aloop.call_soon_threadsafe(_dispatch, batch)
            except RuntimeError:                      # the event loop is closed: nobody is listening
                pass

    def _publish_snapshot(self) -> None:
        e = self.engine
        used, total = e.num_used_kv_blocks, e.num_kv_blocks
        snap = EngineSnapshot(e.num_running, e.num_waiting, used, total, e.num_free_slots, e.max_batch_size,
                              self.snapshot.accounting_error)
        self.snapshot = snap
        m = self.metrics
        m.running.set(snap.running)
        m.waiting.set(snap.waiting)
        m.kv_blocks_used.set(used)
        m.kv_blocks_total.set(total)
        m.kv_usage.set(used / total if total else 0.0)
        m.free_slots.set(snap.free_slots)

    def _check_idle(self) -> None:
        """With nothing unfinished every block and slot must be free: record it if not. Only
        the engine's public counters are read; its exact internal accounting is its tests' job."""
        e = self.engine
        error = None
        if e.num_used_kv_blocks or e.num_free_slots != e.max_batch_size:
            error = f"idle engine holds {e.num_used_kv_blocks} blocks and {e.max_batch_size - e.num_free_slots} slots"
            logger.error("engine accounting: %s", error)
        self.snapshot = EngineSnapshot(**{**self.snapshot.__dict__, "accounting_error": error})


def _dispatch(batch: list[tuple[Submission, list[tuple]]]) -> None:
    for submission, events in batch:
        submission.post(events)
