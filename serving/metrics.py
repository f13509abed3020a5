"""Prometheus metrics, under vLLM's names where vLLM has the metric, so dashboards and
alerts written for vLLM read this server unchanged; `ascend_dspark:` names for the rest.

The registry belongs to one app (not prometheus-client's global one), so two servers in
one process (tests, embedding) never share or collide on counters. Everything is recorded
by the engine-loop thread as steps complete; prometheus-client is thread-safe.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from ascend_dspark.engine.outputs import RequestStats

disable_created_metrics()      # no `*_created` series (vLLM turns them off too)

# vLLM's bucket edges, so histograms can be compared side by side.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


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

    def record_spec_steps(self, stats: RequestStats, first_step: int) -> None:
        """Count the verify steps `stats` gained since `first_step` (stats are cumulative)."""
        for accepted, proposed in zip(stats.accepted_lengths[first_step:], stats.proposal_lengths[first_step:]):
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
        return generate_latest(self.registry)
