"""Which requests run in the next engine step, and the KV blocks and slots they hold.

Every step the scheduler
1. grows each decoding request's blocks to cover what the coming verify step writes (the
   anchor and K drafts in the target's cache, up to `lookahead` block positions in the
   drafter's); when blocks run out it preempts the newest request (its blocks and slot are
   freed, it goes back to the front of the queue and is recomputed later: seeded noise makes
   the recomputation give the same tokens);
2. fills a per-step token budget with prompt chunks: requests already prefilling first, then
   waiting requests in arrival order, each admitted only when a sequence slot is free and
   the blocks for its whole prompt (plus the first verify step) are free. A long prompt is
   cut into chunks, so it never stalls the requests that are decoding. Where prompt chunks
   replay captured graphs, the step takes only as many chunks, as wide, as a captured shape
   holds (`prefill_width`): one more would send the whole step down the eager path (one
   host launch per kernel, ~22 ms of host time per step on an H200).

It never touches the device beyond writing block-table rows; the engine runs the plan.
A request that could never fit in the cache is refused when it is added.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ascend_dspark.cache import BlockAllocator, BlockTables

from .request import Request, Status


@dataclass
class PrefillChunk:
    request: Request
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == self.request.prefill_target


@dataclass
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, tables: BlockTables, max_model_len: int, reserve: int, max_prefill_tokens: int,
                 num_slots: int | None = None, num_blocks: int | None = None,
                 prefill_width: Callable[[int], int] | None = None) -> None:
        """`reserve`: positions one verify step writes from the anchor on (max(K + 1, lookahead)).
        `num_slots`: the sequence slots requests may use (the default: every table row);
        `num_blocks`: the blocks 0..num_blocks-1 it hands out (the default: all). Rows and
        blocks past them belong to the model runner (a graph bucket's padding slots).
        `prefill_width(rows)`: the widest chunk a step of `rows` prompt chunks may hold (the
        prefill graphs' shapes, PrefillGraphRunner.widest); None: the token budget alone."""
        self.tables = tables
        self.allocator = BlockAllocator(tables.num_blocks if num_blocks is None else num_blocks)
        self.max_model_len = max_model_len
        self.reserve = reserve
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_width = prefill_width
        self.num_slots = tables.num_seqs if num_slots is None else num_slots
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
        self.waiting: deque[Request] = deque()
        self.prefilling: dict[str, Request] = {}     # by id, in admission order
        self.running: dict[str, Request] = {}

    # -- requests in and out ------------------------------------------------------------------
    def blocks_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Blocks a request holds at its longest: its last anchor plus one verify step."""
        last_anchor = min(prompt_len + max_tokens - 1, self.max_model_len - 1) - 1
        return self.tables.blocks_for(last_anchor + self.reserve)

    def add(self, request: Request) -> None:
        need = self.blocks_needed(len(request.prompt_ids), request.params.max_tokens)
        if need > self.allocator.num_blocks:
            raise ValueError(
                f"request needs up to {need} KV blocks of {self.tables.block_size} tokens "
                f"({len(request.prompt_ids)} prompt tokens + max_tokens {request.params.max_tokens}) but the "
                f"cache has {self.allocator.num_blocks}: lower max_tokens or give the cache more blocks")
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """Free everything the request holds (finished or aborted), at once."""
        rid = request.request_id
        if self.running.pop(rid, None) is None and self.prefilling.pop(rid, None) is None:
            if request in self.waiting:
                self.waiting.remove(request)
        self._release(request)
        request.status = Status.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    # -- the plan -------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._grow_running(plan)
        self._fill_prefill(plan)
        plan.decode = list(self.running.values())
        self.tables.flush()
        return plan

    def _grow_running(self, plan: StepPlan) -> None:
        for request in sorted(self.running.values(), key=lambda r: r.arrival):      # oldest first
            if request.status is not Status.RUNNING:
                continue                                  # preempted by an earlier iteration
            want = self.tables.blocks_for(request.num_cached + self.reserve) - len(self.tables.owned[request.slot])
            while want > 0 and not self.allocator.can_allocate(want):
                victim = self._newest()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is request:
                    break
            if request.status is Status.RUNNING and want > 0:
                self.tables.extend(request.slot, self.allocator.allocate(want))

    def grow_ahead(self, requests: list[Request], ahead: int) -> bool:
        """Blocks for a step launched before the last one's results are read (the engine's
        overlap): each row may have committed up to `ahead` positions the host does not know
        of yet. Never preempts: False (nothing allocated) when the blocks are not free or a
        row would pass its table."""
        wants = []
        for request in requests:
            need = self.tables.blocks_for(request.num_cached + ahead + self.reserve)
            if need > self.tables.max_blocks_per_seq:
                return False
            wants.append((request.slot, need - len(self.tables.owned[request.slot])))
        if not self.allocator.can_allocate(sum(max(want, 0) for _, want in wants)):
            return False
        for slot, want in wants:
            if want > 0:
                self.tables.extend(slot, self.allocator.allocate(want))
        self.tables.flush()
        return True

    def _fill_prefill(self, plan: StepPlan) -> None:
        budget, rows, width = self.max_prefill_tokens, 0, 0
        for request in list(self.prefilling.values()):
            chunk = self._chunk(request, budget, rows, width)
            if chunk is None:
                return
            plan.prefill.append(chunk)
            rows, width = rows + 1, max(width, chunk.end - chunk.start)
        while self.waiting and self.free_slots:
            request = self.waiting[0]
            need = min(self.tables.blocks_for(request.prefill_target + self.reserve),
                       self.blocks_needed(len(request.prompt_ids), request.params.max_tokens))
            if not self.allocator.can_allocate(need):
                return
            chunk = self._chunk(request, budget, rows, width)
            if chunk is None:
                return
            self.waiting.popleft()
            request.slot = self.free_slots.pop()
            request.status = Status.PREFILL
            request.num_cached = 0
            self.tables.extend(request.slot, self.allocator.allocate(need))
            self.prefilling[request.request_id] = request
            plan.prefill.append(chunk)
            rows, width = rows + 1, max(width, chunk.end - chunk.start)

    def _chunk(self, request: Request, budget: int, rows: int, width: int) -> PrefillChunk | None:
        """The next chunk of `request` if the padded prefill batch stays within the budget (and,
        with prefill graphs, within a captured shape)."""
        remaining = request.prefill_target - request.num_cached
        size = min(remaining, budget // (rows + 1))
        if self.prefill_width is not None:
            widest = self.prefill_width(rows + 1)
            if widest < width:
                return None
            size = min(size, widest)
        if size < 1 or (rows + 1) * max(width, size) > budget:
            return None
        return PrefillChunk(request, request.num_cached, request.num_cached + size)

    def prefill_done(self, request: Request) -> None:
        del self.prefilling[request.request_id]
        self.running[request.request_id] = request
        request.status = Status.RUNNING

    # -- preemption -----------------------------------------------------------------------------
    def _newest(self) -> Request:
        return max([*self.running.values(), *self.prefilling.values()], key=lambda r: r.arrival)

    def _preempt(self, request: Request) -> None:
        if self.running.pop(request.request_id, None) is None:
            del self.prefilling[request.request_id]
        self._release(request)
        request.status = Status.WAITING
        request.num_cached = 0
        # Back in arrival order, ahead of everything that came later.
        position = next((i for i, r in enumerate(self.waiting) if r.arrival > request.arrival), len(self.waiting))
        self.waiting.insert(position, request)

    def _release(self, request: Request) -> None:
        if request.slot is not None:
            self.allocator.free(self.tables.release(request.slot))
            self.free_slots.append(request.slot)
            request.slot = None

    # -- accounting -----------------------------------------------------------------------------
    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests (not by the runner's own rows)."""
        return self.allocator.num_used
