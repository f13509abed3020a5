"""Exact accounting of a scheduler, checked by tests after every step: each block is free
xor owned by one request's slot, each slot free xor held by one running/prefilling request,
and waiting requests hold nothing."""

from __future__ import annotations


def check_accounting(scheduler) -> None:
    request_slots = range(scheduler.num_slots)
    scheduler.allocator.check([scheduler.tables.owned[s] for s in request_slots])
    held = [r.slot for r in [*scheduler.prefilling.values(), *scheduler.running.values()]]
    free = scheduler.free_slots
    if None in held or len(set(held)) != len(held) or set(held) & set(free) or len(held) + len(free) != scheduler.num_slots:
        raise AssertionError(f"slots: held {held}, free {free}")
    for slot in request_slots:
        if slot not in held and scheduler.tables.owned[slot]:
            raise AssertionError(f"slot {slot} is free but owns blocks")
    if any(r.slot is not None for r in scheduler.waiting):
        raise AssertionError("a waiting request holds a slot")
