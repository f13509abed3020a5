"""The scheduler's plan, step by step, against plans worked out by hand from its rules.

No model and no device work: the engine's host bookkeeping is replayed here (a prefill
chunk caches its positions, a prompt's last chunk samples one token, a decode row commits
its accepted drafts + 1), and every step's plan (prefill chunks, decode rows, preempted
requests), slots, statuses and blocks are compared with numbers derived from the rules in
scheduler.py:
- growth: before a verify step each decoding request holds blocks_for(num_cached +
  reserve) blocks; when they are not free the newest request (running or prefilling) is
  preempted: its slot and blocks are freed, it waits again in arrival order, and it is
  recomputed from position 0;
- admission: requests already prefilling get their next chunk first, then waiting ones in
  arrival order, each only with a free slot and min(blocks_for(prompt + reserve),
  blocks_needed) free blocks; with `rows` chunks planned, a new chunk is at most
  budget // (rows + 1) tokens and the padded batch, rows x widest chunk, stays within the
  budget; with prefill graphs, a step of `rows` chunks is also no wider than the widest
  captured shape of at least that many rows.
"""

from __future__ import annotations

from accounting import check_accounting

from ascend_dspark.engine.request import Request, Status
from ascend_dspark.engine.scheduler import Scheduler
from ascend_dspark.cache import BlockTables
from ascend_dspark.spec.sampling import SamplingParams

BLOCK = 4
RESERVE = 4                     # K = 3
MAX_MODEL_LEN = 64


def make(num_slots: int, num_blocks: int, budget: int, prefill_width=None) -> Scheduler:
    per_seq = -(-(MAX_MODEL_LEN - 2 + RESERVE) // BLOCK)
    tables = BlockTables(num_slots, per_seq, num_blocks, BLOCK, "cpu", scratch_tokens=budget)
    return Scheduler(tables, MAX_MODEL_LEN, RESERVE, budget, prefill_width=prefill_width)


def add(sched: Scheduler, arrival: int, prompt_len: int, max_tokens: int = 20) -> Request:
    request = Request(f"r{arrival}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                      frozenset(), arrival)
    sched.add(request)
    return request


def step(sched: Scheduler, accepted: dict[str, int] | None = None):
    """One schedule() and the engine's host bookkeeping of its plan; returns the plan as
    (prefill chunks (id, start, end), decode ids, preempted ids)."""
    plan = sched.schedule()
    summary = ([(c.request.request_id, c.start, c.end) for c in plan.prefill],
               [r.request_id for r in plan.decode], [r.request_id for r in plan.preempted])
    for r in plan.decode:
        n = (accepted or {}).get(r.request_id, 0) + 1
        r.output += [5] * n
        r.num_cached += n
    for c in plan.prefill:
        c.request.num_cached = c.end
        if c.end == c.request.prefill_target:
            sched.prefill_done(c.request)
            if not c.request.output:
                c.request.output.append(5)
    check_accounting(sched)
    return summary


def blocks(sched: Scheduler, *requests: Request) -> list[int]:
    return [len(sched.tables.owned[r.slot]) for r in requests]


def test_chunks_split_the_padded_budget_and_running_requests_grow():
    sched = make(num_slots=4, num_blocks=32, budget=9)
    r0, r1, r2 = add(sched, 0, 10), add(sched, 1, 7), add(sched, 2, 5)

    # r0 takes 9 of 10 (the whole budget); r1 would need 2 rows x 9 > 9.
    assert step(sched) == ([("r0", 0, 9)], [], [])
    assert (r0.slot, r0.status, r1.status, r1.slot) == (0, Status.PREFILL, Status.WAITING, None)
    assert blocks(sched, r0) == [4]                        # blocks_for(10 + 4)
    # r0's last token (1 row of 1), then r1 gets 9 // 2 = 4 (2 rows x 4 <= 9); r2 would
    # get 9 // 3 = 3, but 3 rows x 4 > 9.
    assert step(sched) == ([("r0", 9, 10), ("r1", 0, 4)], [], [])
    assert (r0.status, r0.output, r1.slot, r1.status) == (Status.RUNNING, [5], 1, Status.PREFILL)
    assert blocks(sched, r1) == [3]                        # blocks_for(7 + 4)
    # r0 decodes; r1's last 3 tokens, then r2 gets 9 // 2 = 4 (2 rows x 4 <= 9).
    assert step(sched, {"r0": 2}) == ([("r1", 4, 7), ("r2", 0, 4)], ["r0"], [])
    assert (r0.num_cached, r2.slot) == (13, 2)
    assert blocks(sched, r0, r1, r2) == [4, 3, 3]
    # r0 at 13 needs blocks_for(13 + 4) = 5: one more; r1 at 7 has its 3.
    assert step(sched) == ([("r2", 4, 5)], ["r0", "r1"], [])
    assert blocks(sched, r0, r1, r2) == [5, 3, 3]
    assert step(sched, {"r1": 3}) == ([], ["r0", "r1", "r2"], [])
    assert (r0.num_cached, r1.num_cached, r2.num_cached) == (15, 12, 6)
    assert step(sched) == ([], ["r0", "r1", "r2"], [])
    assert blocks(sched, r0, r1, r2) == [5, 4, 3]          # r1 at 12 + 4: a 4th block
    assert not sched.waiting and sched.free_slots == [3]


def test_a_prompt_that_fills_the_budget_exactly_is_one_chunk():
    sched = make(num_slots=2, num_blocks=32, budget=8)
    r0, r1 = add(sched, 0, 8), add(sched, 1, 1)
    assert step(sched) == ([("r0", 0, 8)], [], [])         # 1 row x 8 <= 8; r1: 2 x 8 > 8
    assert step(sched) == ([("r1", 0, 1)], ["r0"], [])      # a 1-token prompt is a chunk of 1
    assert r1.status is Status.RUNNING and blocks(sched, r0, r1) == [3, 2]


def test_chunks_stay_within_the_prefill_graphs_shapes():
    """Captured shapes (1, 8), (2, 4), (4, 2) under a budget of 16: a step of 1 chunk holds up
    to 8 tokens, of 2 up to 4, of 3 or 4 up to 2, of 5 none. The budget alone would take r0's
    whole prompt (10 <= 16) in step 1 and r1 beside it in step 2 (2 rows x 8 <= 16)."""
    widest = {1: 8, 2: 4, 3: 2, 4: 2}
    sched = make(num_slots=6, num_blocks=64, budget=16, prefill_width=lambda rows: widest.get(rows, 0))
    r0, r1, r2, r3, r4, r5 = (add(sched, i, n) for i, n in enumerate((10, 3, 2, 1, 1, 1)))
    assert step(sched) == ([("r0", 0, 8)], [], [])                    # r1 beside it: 8 > 4
    assert step(sched) == ([("r0", 8, 10), ("r1", 0, 3)], [], [])      # r2 as a third: 3 > 2
    assert step(sched) == ([("r2", 0, 2), ("r3", 0, 1), ("r4", 0, 1), ("r5", 0, 1)], ["r0", "r1"], [])
    assert all(r.status is Status.RUNNING for r in (r0, r1, r2, r3, r4, r5))


def test_the_newest_request_preempts_itself_and_resumes_from_its_committed_tokens():
    sched = make(num_slots=2, num_blocks=5, budget=10)
    r0, r1 = add(sched, 0, 5, max_tokens=6), add(sched, 1, 4, max_tokens=6)
    assert step(sched) == ([("r0", 0, 5), ("r1", 0, 4)], [], [])      # 3 + 2 blocks: none left
    assert step(sched) == ([], ["r0", "r1"], [])
    # r0 at 6 still fits its 3 blocks; r1 at 5 + 4 needs a 3rd, none is free, and r1 is the newest.
    assert step(sched, {"r0": 1}) == ([], ["r0"], ["r1"])
    assert (r1.status, r1.slot, r1.num_cached, r1.output) == (Status.WAITING, None, 0, [5, 5])
    assert list(sched.waiting) == [r1] and sched.allocator.num_free == 2
    # r1 comes back with blocks_for(5 + 4) = 3: not while r0 holds 3, then 4 of the 5.
    assert step(sched) == ([], ["r0"], [])
    assert step(sched) == ([], ["r0"], [])
    assert blocks(sched, r0) == [4] and r1.status is Status.WAITING
    sched.finish(r0)                                       # 6 tokens: max_tokens
    # Its prefill recomputes everything but the anchor (prompt + output - 1), in r0's old slot.
    assert step(sched) == ([("r1", 0, 5)], [], [])
    assert (r1.slot, r1.status, r1.output, blocks(sched, r1)) == (0, Status.RUNNING, [5, 5], [3])
    assert step(sched) == ([], ["r1"], [])


def test_a_prefilling_request_is_preempted_when_it_is_the_newest():
    sched = make(num_slots=3, num_blocks=8, budget=8)
    r0, r1, r2 = (add(sched, i, n, max_tokens=8) for i, n in enumerate((4, 4, 12)))
    assert step(sched) == ([("r0", 0, 4), ("r1", 0, 4)], [], [])     # 3 rows x 4 > 8: r2 waits
    assert step(sched) == ([("r2", 0, 8)], ["r0", "r1"], [])          # r2 takes the last 4 blocks
    assert r2.status is Status.PREFILL and sched.allocator.num_free == 0
    r3 = add(sched, 3, 2, max_tokens=8)
    # r0 at 5 + 4 needs a 3rd block: r2 (the newest, half prefilled) is preempted; then r1
    # grows too, and r2 (4 blocks) cannot come back with 2 free, nor r3 behind it.
    assert step(sched) == ([], ["r0", "r1"], ["r2"])
    assert (r2.status, r2.slot, r2.num_cached) == (Status.WAITING, None, 0)
    assert list(sched.waiting) == [r2, r3]                 # ahead of the later arrival
    assert blocks(sched, r0, r1) == [3, 3] and sched.allocator.num_free == 2


def two_running(num_blocks: int) -> tuple[Scheduler, Request, Request]:
    """r0 (5 cached, 3 blocks) and r1 (3 cached, 2 blocks) decoding, num_blocks - 5 free."""
    sched = make(num_slots=2, num_blocks=num_blocks, budget=16)
    r0, r1 = add(sched, 0, 5, max_tokens=8), add(sched, 1, 3, max_tokens=8)
    assert step(sched) == ([("r0", 0, 5), ("r1", 0, 3)], [], [])
    assert blocks(sched, r0, r1) == [3, 2]
    return sched, r0, r1


def test_grow_ahead_covers_a_step_the_host_has_not_read_yet():
    sched, r0, r1 = two_running(num_blocks=7)
    # 4 positions ahead: r0 needs blocks_for(5 + 4 + 4) = 4, r1 blocks_for(3 + 4 + 4) = 3: the last 2.
    assert sched.grow_ahead([r0, r1], 4) is True
    assert blocks(sched, r0, r1) == [4, 3] and sched.allocator.num_free == 0
    # ... on the device too (no schedule() in between to flush the table).
    for r in (r0, r1):
        assert sched.tables.table[r.slot, :len(sched.tables.owned[r.slot])].tolist() == sched.tables.owned[r.slot]
    assert sched.grow_ahead([r0, r1], 3) is True           # covered already: nothing to add
    assert blocks(sched, r0, r1) == [4, 3]
    # r1 commits 4 more: it now wants a 4th block; r0's spare block is not r1's to use.
    r1.output += [5] * 4
    r1.num_cached += 4
    assert sched.grow_ahead([r0, r1], 3) is False and blocks(sched, r0, r1) == [4, 3]


def test_grow_ahead_is_all_or_nothing_and_never_preempts():
    sched, r0, r1 = two_running(num_blocks=6)               # 1 free, 2 wanted
    assert sched.grow_ahead([r0, r1], 4) is False
    assert blocks(sched, r0, r1) == [3, 2] and sched.allocator.num_free == 1
    assert (r0.status, r1.status) == (Status.RUNNING, Status.RUNNING) and not sched.waiting
    assert sched.grow_ahead([r0], 4) is True and blocks(sched, r0, r1) == [4, 2]
    # A row that would pass its table (max_model_len) is refused, whatever is free.
    sched, r0, r1 = two_running(num_blocks=40)
    per_seq = sched.tables.max_blocks_per_seq
    assert sched.grow_ahead([r0, r1], per_seq * BLOCK - 5 - RESERVE + 1) is False
    assert blocks(sched, r0, r1) == [3, 2]
    assert sched.grow_ahead([r0], per_seq * BLOCK - 5 - RESERVE) is True and blocks(sched, r0) == [per_seq]
