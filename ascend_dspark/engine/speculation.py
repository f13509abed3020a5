"""The speculation policy: how many drafts each decode step verifies, and when the drafter sleeps.

The engine asks it three things per step, all from results already read (one step old, two
under overlap), so nothing a step samples can influence them (lossless by construction):
- `verify_lens(rows)`: each row's drafts this step. "fixed": the request's cap (its
  `num_speculative_tokens`, at most the engine's K). "confidence": at most one depth for the
  step, chosen from the depth menu for the most expected committed tokens per second:
  predicted acceptance (spec/acceptance.py) against what a step of this batch size and depth
  costs (engine/step_costs.py), plain decoding (depth 0) among the choices.
- `may_draft(request)`: whether the drafter must keep reading the request's tokens.
- after each step, `observe` (realised acceptance) and `step_read` (its wall time).

Where the cost table was profiled at start-up (not handed in), it is corrected online by the
steps the engine really runs: the profile times a step's device work and its host copy,
but a served step also pays the host's bookkeeping, streaming and the prefill chunks between
decode steps, and on a fast device that is most of it (an H100 serving 64 requests: 1.6 ms
profiled for a plain step, ~11 ms between steps in the server). A cell that has run is judged
by what it really cost, and one that has not by its profile plus what the steps of its batch
size cost beyond theirs (step_costs.py), so measuring plain steps alone already prices drafting.

The drafter sleeps after SLEEP_AFTER consecutive steps planned at depth 0, if the acceptance
measured across requests would not make drafting pay either (`_plan_sleep`): a depth-0 step
still feeds the drafter every committed token (and every prompt chunk), so that it could
draft next step; asleep, steps cost what plain decoding costs. Depth 0 is therefore judged
at plain decoding's cost (the profile's drafter-free column), the cost it has once the
drafter sleeps: drafting must beat plain decoding, not a step that feeds an idle drafter.
"""

from __future__ import annotations

import logging
import time

from ascend_dspark.spec.acceptance import AcceptanceEstimator
from ascend_dspark.spec.prefix_scheduler import best_depth

from .request import Request
from .step_costs import StepCosts

logger = logging.getLogger(__name__)

SPECULATION_POLICIES = ("fixed", "confidence")
SLEEP_AFTER = 16               # consecutive steps planned at depth 0 before the drafter sleeps


def depth_menu(num_speculative_tokens: int) -> list[int]:
    """The draft depths the confidence policy chooses from: every depth up to 3, then 5 and K
    (each depth is a step graph per batch bucket; deep drafts rarely survive past 3 anyway)."""
    return sorted({d for d in (0, 1, 2, 3, 5) if d < num_speculative_tokens} | {num_speculative_tokens})


class SpeculationPolicy:
    """`costs` and `acceptance` are None under "fixed". `learn_costs`: correct `costs` by the
    wall time of the decode steps the engine runs (for a profiled table, not a given one)."""

    def __init__(self, policy: str, num_speculative_tokens: int, costs: StepCosts | None = None,
                 acceptance: AcceptanceEstimator | None = None, learn_costs: bool = False) -> None:
        self.policy = policy
        self.num_speculative_tokens = num_speculative_tokens
        self.depths = depth_menu(num_speculative_tokens) if policy == "confidence" else []
        self.costs = costs
        self.acceptance = acceptance
        self.learn_costs = learn_costs
        self.depth_counts = [0] * (num_speculative_tokens + 1)        # steps run at each draft depth
        self.drafter_asleep = False
        self.sleeps = 0                             # times the drafter fell asleep
        self._plain_streak = 0
        self._requests: dict[str, Request] = {}
        self._last_read: float | None = None       # when the last decode-only launch was read

    def attach(self, requests: dict[str, Request]) -> None:
        """The engine's live requests (the sleep reaches every one of them)."""
        self._requests = requests

    # -- per step ------------------------------------------------------------------------------
    def verify_lens(self, requests: list[Request]) -> list[int]:
        """The drafts each row proposes and verifies this step: its cap, and under the
        confidence policy at most the step's depth."""
        caps = [0 if r.drafter_asleep else self.cap(r) for r in requests]
        lens = caps if self.acceptance is None else self._confidence_lens(requests, caps)
        self.depth_counts[max(lens)] += 1
        return lens

    def _confidence_lens(self, requests: list[Request], caps: list[int]) -> list[int]:
        if self.drafter_asleep:
            self._maybe_wake(len(requests))
        if not any(caps):
            return caps
        # Seeded sampled requests verify their whole cap: which tokens a seed gives depends on
        # the depth (a draft accepted at position p vs a target sample there, both exact in
        # law), so a depth planned from the batch would make a seed's output depend on the load.
        floor = max((c for c, r in zip(caps, requests) if r.pinned_depth), default=0)
        depths = sorted({d for d in self.depths if d >= floor} | {floor})
        predicted = [self.acceptance.predict(r.acceptance) for r in requests]
        depth = best_depth(predicted, caps, depths, self.costs.steps_per_second)
        self._plan_sleep(depth, len(requests))
        return [min(c, depth) for c in caps]

    def observe(self, requests: list[Request], counts: list[int], verified: list[int],
                confidence: list[list[float]] | None) -> None:
        """A read step's realised acceptance, per row."""
        if self.acceptance is None:
            return
        for j, r in enumerate(requests):
            self.acceptance.observe(r.acceptance, counts[j], verified[j],
                                    confidence[j][:verified[j]] if confidence is not None else None)

    def step_read(self, rows: int, depth: int, drafter_ran: bool, steps: int, decode_only: bool) -> None:
        """The engine read a launch's results. A decode-only launch read right after another
        one: the time between the two reads is what it cost the engine (device and host, with
        overlap the part not hidden), recorded per step (a launch of N plain steps at a 1/N
        share: the cost of a plain step while launches carry N). Prefill steps, and the first
        decode step after one, are not decode-step costs."""
        now = time.perf_counter()
        if decode_only and self._last_read is not None:
            self.record_step(rows, depth, drafter_ran, (now - self._last_read) / steps)
        self._last_read = now if decode_only else None

    def record_step(self, rows: int, depth: int, drafter_ran: bool, seconds: float) -> None:
        """The wall time of a decode step of `rows` rows at `depth` (depth 0: whether the
        drafter still read the tokens) into the cost table, if it learns."""
        if self.learn_costs and self.costs is not None:
            self.costs.record(rows, depth, seconds, plain=depth == 0 and not drafter_ran)

    def may_draft(self, request: Request) -> bool:
        """Whether the request can ever draft (so the drafter must keep reading its tokens)."""
        return not request.drafter_asleep and self.cap(request) > 0

    def cap(self, request: Request) -> int:
        cap = request.params.num_speculative_tokens
        return self.num_speculative_tokens if cap is None else min(cap, self.num_speculative_tokens)

    # -- the drafter's sleep ---------------------------------------------------------------------
    def _plan_sleep(self, depth: int, rows: int) -> None:
        """When the plan has been depth 0 for SLEEP_AFTER steps in a row and the acceptance
        measured across requests would not make drafting pay at this batch size either (the
        rule that wakes it), the drafter sleeps: every request then in the engine (bar seeded
        sampled ones, which keep their depth) and every one admitted while it sleeps never
        drafts, and steps with only such rows are plain decode steps (prefill chunks of such
        requests skip the drafter too). Why both: a run of depth-0 plans can come from the
        requests in the batch alone (one that drafted badly plans depth 0, and at depth 0
        its estimate never moves), and sleeping then would stop drafting for every request
        in flight, for good (the suspected cause of an H100 sweep on MT-Bench prompts with
        60% plain steps at concurrency 16, 0.89x plain decoding where fixed K = 7 made 1.03x)."""
        self._plain_streak = self._plain_streak + 1 if depth == 0 else 0
        if self._plain_streak >= SLEEP_AFTER and not self.drafter_asleep and not self._drafting_pays(rows):
            self.drafter_asleep = True
            self.sleeps += 1
            for r in self._requests.values():
                r.drafter_asleep = r.drafter_asleep or not r.pinned_depth
            logger.info("speculation: %d steps in a row planned without drafts: the drafter sleeps "
                        "(requests admitted from now on decode plainly until drafting could pay)", SLEEP_AFTER)

    def _maybe_wake(self, rows: int) -> None:
        """The drafter wakes (requests admitted from then on draft again) once the acceptance
        measured across requests so far would make drafting pay at this batch size: while it
        sleeps that estimate stands still, so this follows the load."""
        if self._drafting_pays(rows):
            self.drafter_asleep = False
            self._plain_streak = 0
            logger.info("speculation: drafting could pay at batch %d again: the drafter wakes", rows)

    def _drafting_pays(self, rows: int) -> bool:
        """Whether `rows` requests drafting at the engine-wide acceptance would beat plain decoding."""
        estimate = self.acceptance.engine
        k = self.num_speculative_tokens
        return best_depth([estimate] * rows, [k] * rows, self.depths, self.costs.steps_per_second) > 0
