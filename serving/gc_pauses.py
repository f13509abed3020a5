"""Python's cyclic garbage collector, kept out of the decode loop's way, and timed.

Why: a full (generation 2) collection walks every object the process holds, and the engine
loop's thread waits for it (the collector runs under the GIL, on whichever thread allocated
last). After start-up a server holds ~350k objects (model, tokenizer, graphs, FastAPI): one
full collection took 175 ms on this CPU. Each one stalls every running request: the likely
reason an H100 sweep had TTFT p99 of 130-510 ms at some loads while p50 stayed at 8-90 ms
(BENCHMARKS.md, issue 18), for every server kind.

`freeze_startup_objects` collects once and moves what start-up built into the permanent
generation (`gc.freeze`, as vLLM and SGLang do), so later collections walk only what serving
allocates; `thaw` undoes it at shutdown, so an engine that is dropped (tests, embedding)
is collected again. `GcPauses` times every collection into a histogram, so a stall that
remains shows on /metrics (`ascend_dspark:gc_pause_seconds`).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    start = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - start
    gc.freeze()
    logger.info("froze %d start-up objects out of the cyclic GC (a full collection took %.0f ms)",
                gc.get_freeze_count(), 1e3 * took)


def thaw() -> None:
    gc.unfreeze()


class GcPauses:
    """Times each collection into `histogram` (Metrics.gc_pause: labels model name and
    generation) while installed."""

    def __init__(self, histogram, model_name: str) -> None:
        self.histogram = histogram
        self.model_name = model_name
        self._started: float | None = None

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.histogram.labels(self.model_name, str(info["generation"])).observe(time.perf_counter() - self._started)
            self._started = None
