"""Several plain decode steps per launch: the host's per-step work paid once per N tokens.

Why: at batch 1 a plain decode step of a small model costs the device less than the host's
Python around it (the 135M default model on an H100: ~1.2 ms of device time; scheduling,
staging, the host copy and committing take longer), so even with the engine's overlap the
device idles a fifth of the time. When nothing can change the batch for N steps, the engine
launches N decode steps at once (`ModelRunner.decode_steps`: one graph replay of N steps, or
N eager steps with no host read between them) and reads the N tokens of every row with one
host copy. The device state each step needs (anchors, cache lengths) is already on the
device, and sampling is counter-based on (seed, position), so the tokens are those of N
single steps.

When (`MultiStep.steps_for`), else one step:
- every decode row is plain: no row may draft (no drafter, or the drafter asleep for every
  row: speculation.py). Speculative steps stay one per launch, since each step's depth is
  planned from the confidences and acceptance the previous step returned;
- no row has a grammar (its masks need each step's tokens on the host) or asks for logprobs
  (graphs do not produce them, so such a batch runs eager single steps anyway);
- nobody is prefilling, and no waiting request could be admitted (a slot is free): it should
  join at the next step, not N steps later (the same rule that ends an overlap chain);
- every row has N tokens to go before max_tokens and max_model_len, counting the `ahead`
  tokens a step still in flight may commit: no row can finish by length inside the launch,
  and no step writes past the row's last position;
- the blocks for the N positions are free (`Scheduler.grow_ahead`, which never preempts).

A row that stops inside the launch (EOS, a stop token, a stop string): `commit` hands the
tokens to the output processor one step at a time, as N single steps would, and stops
committing a row once it has finished; its tokens after the stop are dropped like a
rejected tail, and the engine frees its slot and blocks as after a single step (the device
state advanced past the stop belongs to a slot that the next prefill there resets).

Accounting: each of the N steps is one step with one token, in the request's stats
(accepted length 1, no drafts) and in the policy's depth counts; the step-cost table learns
the launch's wall time divided by N (Engine._time_step): what a plain token costs while
launches carry N steps, which drafting must beat.
"""

from __future__ import annotations

from .output_processor import OutputProcessor
from .request import Request
from .scheduler import Scheduler
from .speculation import SpeculationPolicy

# 4 plain steps per launch where graphs run: at batch 1 the host's work around a launch (~1.5 ms
# on an H100 host, a 135M model) is then well below the device's 4 steps (~4.8 ms), so with the
# overlap the device never waits; more steps would gain little and make the rest worse: tokens
# stream in bursts of N, a waiting request joins up to N steps late, and a row that stops by EOS
# computes up to N - 1 steps for nothing.
DEFAULT_STEPS_PER_LAUNCH = 4


class MultiStep:
    """When the engine's next decode launch carries several steps, and committing their tokens."""

    def __init__(self, steps_per_launch: int, scheduler: Scheduler, policy: SpeculationPolicy,
                 outputs: OutputProcessor, max_model_len: int) -> None:
        if steps_per_launch < 1:
            raise ValueError(f"decode_steps_per_launch must be >= 1, got {steps_per_launch}")
        self.steps_per_launch = steps_per_launch
        self.scheduler = scheduler
        self.policy = policy
        self.outputs = outputs
        self.max_model_len = max_model_len
        self.launches = 0              # multi-step launches so far (tests, benchmarks)

    def steps_for(self, rows: list[Request], ahead: int) -> int:
        """Steps the launch of these decode rows carries: `steps_per_launch` when every rule
        of the module docstring holds (the blocks for them then reserved), else 1. `ahead`:
        tokens per row a step in flight may commit before this launch runs."""
        n = self.steps_per_launch
        if n <= 1 or not rows:
            return 1
        scheduler = self.scheduler
        if scheduler.prefilling or (scheduler.waiting and scheduler.free_slots):
            return 1
        for r in rows:
            if self.policy.may_draft(r) or r.grammar is not None or r.params.logprobs is not None:
                return 1
            done = len(r.output) + ahead + n
            if done > r.params.max_tokens or len(r.prompt_ids) + done > self.max_model_len:
                return 1
        if not scheduler.grow_ahead(rows, ahead + n - 1):
            return 1
        self.launches += 1
        return n

    def commit(self, requests: list[Request], token_rows: list[list[int]], confidences: bool) -> None:
        """Commit a multi-step launch's tokens (`token_rows[i][j]`: row i's token of step j)
        one step at a time: a row that finished at step j commits nothing after it.
        `confidences`: the steps carried (empty) confidence lists, as a sleeping drafter with a
        confidence head gives for plain single steps, so the stats stay uniform."""
        for j in range(len(token_rows[0]) if token_rows else 0):
            going = [i for i, r in enumerate(requests) if r.finish_reason is None]
            if not going:
                return
            rows = [requests[i] for i in going]
            zeros = [0] * len(rows)
            conf = [[] for _ in rows] if confidences else None
            self.outputs.commit(rows, [[token_rows[i][j]] for i in going], zeros, zeros, conf)
            self.policy.observe(rows, zeros, zeros, conf)
