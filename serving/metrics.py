"""Prometheus metrics, under vLLM's names where vLLM has the metric, so dashboards and
alerts written for vLLM read this server unchanged; `ascend_dspark:` names for the rest.

The registry belongs to one app (not prometheus-client's global one), so two servers in
one process (tests, embedding) never share or collide on counters. Everything is recorded
by the engine-loop thread as steps complete; prometheus-client is thread-safe.

`SpeculationTotals` keeps what the Prometheus counters cannot say: how often each draft
position was *reached* (verified with every earlier draft accepted), so the conditional
acceptance per position, and the generation rate over the last few seconds. It backs
GET /speculation and the live chart of the built-in page.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from ascend_dspark.engine.outputs import RequestStats
from ascend_dspark.training.metrics import auroc, brier, ece

CALIBRATION_WINDOW = 20_000

disable_created_metrics()      # no `*_created` series (vLLM turns them off too)

# vLLM's bucket edges, so histograms can be compared side by side.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
GC_PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]

        def counter(name, doc, labels=()):
            return Counter(name, doc, [*m, *labels], registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, m, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        self.model_name = model_name
        self.num_drafts = counter("vllm:spec_decode_num_drafts", "Verify steps that checked at least one draft token.").labels(model_name)
        self.num_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.").labels(model_name)
        self.num_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.").labels(model_name)
        self._accepted_per_pos = counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                         "Draft tokens accepted at each draft position (0-based).", ["position"])
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.").labels(model_name)
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.").labels(model_name)
        self._success = counter("vllm:request_success", "Finished sequences by finish reason.", ["finished_reason"])
        self._rejected = counter("ascend_dspark:requests_rejected",
                                 "Requests refused before reaching the engine, by reason.", ["reason"])
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Mean time per output token after the first, per sequence.", TPOT_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish, per sequence.", E2E_BUCKETS)
        self.running = gauge("vllm:num_requests_running", "Sequences holding an engine slot.")
        self.waiting = gauge("vllm:num_requests_waiting", "Sequences queued for a slot.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).")
        self.kv_blocks_used = gauge("ascend_dspark:kv_blocks_used", "KV-cache blocks held by sequences.")
        self.kv_blocks_total = gauge("ascend_dspark:kv_blocks_total", "KV-cache blocks in the pool.")
        self.free_slots = gauge("ascend_dspark:free_slots", "Engine sequence slots free.")
        self.in_flight = gauge("ascend_dspark:sequences_in_flight", "Sequences admitted by the server and not finished.")
        self.engine_alive = gauge("ascend_dspark:engine_alive", "1 while the engine loop runs, 0 once it died.")
        self.gc_pause = Histogram("ascend_dspark:gc_pause_seconds", "Cyclic garbage collections, by generation: "
                                  "the whole process waits for each.", [*m, "generation"], buckets=GC_PAUSE_BUCKETS,
                                  registry=r)
        self.totals = SpeculationTotals()
        self.confidence_ece = gauge("ascend_dspark:confidence_ece",
                                    "Confidence head: expected calibration error over the recent reached draft positions.")
        self.confidence_auroc = gauge("ascend_dspark:confidence_auroc",
                                      "Confidence head: AUROC of c_k for acceptance at the recent reached positions.")
        self.confidence_brier = gauge("ascend_dspark:confidence_brier",
                                      "Confidence head: Brier score over the recent reached draft positions.")

    def generated(self, n: int, now: float) -> None:
        """`n` new tokens at time.monotonic() `now`."""
        self.generation_tokens.inc(n)
        self.totals.generated(n, now)

    def record_spec_steps(self, stats: RequestStats, first_step: int) -> None:
        """Count the verify steps `stats` gained since `first_step` (stats are cumulative)."""
        new = list(zip(stats.accepted_lengths[first_step:], stats.proposal_lengths[first_step:]))
        self.totals.record(new, stats.confidences[first_step:] if stats.confidences else None)
        for accepted, proposed in new:
            if proposed == 0:
                continue
            n = min(accepted - 1, proposed)
            self.num_drafts.inc()
            self.num_draft_tokens.inc(proposed)
            self.num_accepted_tokens.inc(n)
            for k in range(n):
                self._accepted_per_pos.labels(self.model_name, str(k)).inc()

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        calibration = self.totals.calibration()
        # AUROC is undefined (None) while every reached draft was accepted, or every one rejected.
        for gauge, key in ((self.confidence_ece, "ece"), (self.confidence_auroc, "auroc"),
                           (self.confidence_brier, "brier")):
            if calibration[key] is not None:
                gauge.set(calibration[key])
        return generate_latest(self.registry)


class SpeculationTotals:
    """Speculation since the server started, summed over every request, plus the generation
    rate over the last `window_s` seconds. Written by the engine-loop thread, read by
    handlers: one lock around plain integers.

    Per verify step with `proposed` drafts of which `accepted - 1` were accepted: positions
    0..min(accepted - 1, proposed - 1) were reached, the first `accepted - 1` accepted (the
    engine's RequestStats.position_reached / position_accepted, summed over requests).
    """

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self.verify_steps = 0               # every decode step, speculating or not
        self.committed = 0                  # tokens those steps committed (bonus included)
        self.num_drafts = 0                 # steps that verified at least one draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.reached: list[int] = []
        self.accepted: list[int] = []
        self.verify_lengths: list[int] = []     # request-steps per drafts verified (0..K): the depths chosen
        # (c_k, accepted) at the most recent reached positions: the confidence head's calibration
        self._pairs: deque[tuple[float, bool]] = deque(maxlen=CALIBRATION_WINDOW)
        self.generation_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()

    def record(self, steps: list[tuple[int, int]], confidences: list[list[float]] | None = None) -> None:
        """(accepted length incl. the bonus token, drafts verified) of new verify steps, and
        the drafter's c_1..c_verified of each, where it has a confidence head."""
        if not steps:
            return
        with self._lock:
            for i, (accepted, proposed) in enumerate(steps):
                if confidences is not None:
                    n = min(accepted - 1, proposed)
                    self._pairs.extend((confidences[i][k], k < n) for k in range(min(n + 1, proposed)))
                self.verify_steps += 1
                self.committed += accepted
                if len(self.verify_lengths) <= proposed:
                    self.verify_lengths += [0] * (proposed + 1 - len(self.verify_lengths))
                self.verify_lengths[proposed] += 1
                if proposed <= 0:
                    continue
                n = min(accepted - 1, proposed)
                self.num_drafts += 1
                self.num_draft_tokens += proposed
                self.num_accepted_tokens += n
                reached = min(n + 1, proposed)
                if len(self.reached) < reached:
                    grow = reached - len(self.reached)
                    self.reached += [0] * grow
                    self.accepted += [0] * grow
                for k in range(reached):
                    self.reached[k] += 1
                for k in range(n):
                    self.accepted[k] += 1

    def calibration(self) -> dict:
        """ECE, AUROC and Brier of the confidence head's c_k against acceptance at the last
        CALIBRATION_WINDOW reached positions (the conditional view, as the scheduler uses it)."""
        with self._lock:
            pairs = list(self._pairs)
        if not pairs:
            return {"count": 0, "ece": None, "auroc": None, "brier": None}
        probs, labels = [p for p, _ in pairs], [y for _, y in pairs]
        value = lambda x: None if math.isnan(x) else x       # noqa: E731 - JSON has no NaN
        return {"count": len(pairs), "ece": value(ece(probs, labels)), "auroc": value(auroc(probs, labels)),
                "brier": value(brier(probs, labels))}

    def generated(self, n: int, now: float) -> None:
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - self.window_s:
            self._recent.popleft()

    def snapshot(self, width: int = 0, now: float | None = None) -> dict:
        """Totals as plain values; per-position lists padded with zeros to `width` (K)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            recent = sum(n for _, n in self._recent)
            size = max(width, len(self.reached))
            reached = self.reached + [0] * (size - len(self.reached))
            accepted = self.accepted + [0] * (size - len(self.accepted))
            lengths = self.verify_lengths + [0] * (size + 1 - len(self.verify_lengths))
            return {
                "num_verify_steps": self.verify_steps,
                "num_drafts": self.num_drafts,
                "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "mean_accepted_length": self.committed / self.verify_steps if self.verify_steps else 0.0,
                "acceptance_per_position": [a / r if r else 0.0 for a, r in zip(accepted, reached)],
                "position_reached": reached,
                "position_accepted": accepted,
                "verify_length_counts": lengths,
                "generation_tokens": self.generation_tokens,
                "tokens_per_second": recent / self.window_s,
                "window_s": self.window_s,
            }
