"""Several plain decode steps per launch: the host's per-step work paid once per N tokens.

Why: the host's Python around a decode step (scheduling, staging, the host copy, committing)
can cost more than a small model's step on the device. When nothing can change the batch for
N steps, the engine launches N decode steps at once (`ModelRunner.decode_steps`: one graph
replay of N steps, or N eager steps with no host read between them) and reads the N tokens of
every row with one host copy. The device state each step needs (anchors, cache lengths) is
already on the device, and sampling is counter-based on (seed, position), so the tokens are
those of N single steps.

Off by default (`DEFAULT_STEPS_PER_LAUNCH` = 1): measured on an H100 (BENCHMARKS.md, issue 16),
the engine's overlap already hides the host's ~0.3 ms per step behind the device at batch 1
(4 steps per launch: 818 tok/s against 821 with overlap, 810 against 776 without), and the
idle time left sits between the kernels of one graph, which N steps do not remove. It is for
hosts slower than their device, or runs without overlap.

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
the launch's wall time divided by N (SpeculationPolicy.step_read): what a plain token costs while
launches carry N steps, which drafting must beat.
"""

from __future__ import annotations

from .output_processor import OutputProcessor
from .request import Request
from .scheduler import Scheduler
from .speculation import SpeculationPolicy

# One step per launch unless asked (see the module docstring for the measurement). 4 is the
# value to ask for: at batch 1 the host's work around a launch is then far below the device's
# 4 steps; more would gain little and make the rest worse (tokens stream in bursts of N, a
# waiting request joins up to N steps late, a row that stops by EOS computes up to N - 1 steps
# for nothing).
DEFAULT_STEPS_PER_LAUNCH = 1


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
