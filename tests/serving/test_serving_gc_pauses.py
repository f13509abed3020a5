"""The cyclic GC around a server: start-up objects frozen out of collections (and thawed at
shutdown, so a dropped engine is collected again), and every collection timed."""

from __future__ import annotations

import gc
import weakref

from prometheus_client import CollectorRegistry, Histogram

from serving.gc_pauses import GcPauses, freeze_startup_objects, thaw


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_frozen_objects_are_left_alone_until_thawed():
    garbage = Cycle()
    alive = weakref.ref(garbage)
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        del garbage                                  # a dropped cycle built before the freeze
        gc.collect()
        assert alive() is not None                   # frozen: no collection walks it
    finally:
        thaw()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None


def count(registry: CollectorRegistry, generation: str) -> float:
    value = registry.get_sample_value("pause_seconds_count", {"model_name": "m", "generation": generation})
    return value or 0.0


def test_every_collection_is_timed_while_installed():
    registry = CollectorRegistry()
    histogram = Histogram("pause_seconds", "test", ["model_name", "generation"], registry=registry)
    pauses = GcPauses(histogram, "m")
    pauses.install()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        pauses.uninstall()
    assert count(registry, "2") == 1 and count(registry, "0") == 1
    assert registry.get_sample_value("pause_seconds_sum", {"model_name": "m", "generation": "2"}) > 0
    gc.collect()
    assert count(registry, "2") == 1                 # uninstalled
