"""The server's speculation counters: verified depths per request-step, and the confidence
head's calibration over the recent reached positions (computed here by hand)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import SpeculationTotals


def test_verify_length_counts():
    totals = SpeculationTotals()
    totals.record([(3, 7), (1, 0), (1, 0), (2, 3)])
    assert totals.snapshot(width=7)["verify_length_counts"] == [2, 0, 0, 1, 0, 0, 0, 1]


def test_calibration_of_the_reached_positions():
    """Step 1: 2 of 3 accepted, c = (0.9, 0.8, 0.2): pairs (0.9, yes), (0.8, yes), (0.2, no).
    Step 2: 0 of 2 accepted, c = (0.6, 0.5): only position 0 reached, (0.6, no)."""
    totals = SpeculationTotals()
    assert totals.calibration()["count"] == 0
    totals.record([(3, 3), (1, 2)], [[0.9, 0.8, 0.2], [0.6, 0.5]])
    got = totals.calibration()
    assert got["count"] == 4
    assert got["brier"] == pytest.approx((0.1 ** 2 + 0.2 ** 2 + 0.2 ** 2 + 0.6 ** 2) / 4)
    assert got["auroc"] == 1.0                                  # both accepted above both rejected
    assert got["ece"] == pytest.approx((0.1 + 0.2 + 0.2 + 0.6) / 4)   # each in a bin of its own


def test_the_window_keeps_the_most_recent(monkeypatch):
    import serving.metrics as metrics
    monkeypatch.setattr(metrics, "CALIBRATION_WINDOW", 2)
    totals = metrics.SpeculationTotals()
    totals.record([(1, 1), (1, 1), (2, 1)], [[0.1], [0.2], [0.7]])      # rejected, rejected, accepted
    got = totals.calibration()
    assert got["count"] == 2 and got["brier"] == pytest.approx((0.2 ** 2 + 0.3 ** 2) / 2)


def test_metrics_render_while_auroc_is_undefined():
    """Every reached draft accepted: AUROC has no value (one class), and /metrics still renders
    (it was a 500) with the gauges that do have one."""
    from serving.metrics import Metrics

    metrics = Metrics("m")
    metrics.totals.record([(2, 1), (2, 1)], [[0.9], [0.8]])
    assert metrics.totals.calibration()["auroc"] is None
    text = metrics.render().decode()
    assert "brier" in text


def test_speculation_endpoint_shows_the_step_costs_the_policy_learns(tiny_model_dir, tmp_path):
    """A live server under the confidence policy: /speculation carries the start-up profile
    (every depth of the menu, plain decoding's column) and the decode steps measured since."""
    from tests.serving.server_process import running_server, server_env

    env = server_env(tiny_model_dir, max_model_len=128, max_num_seqs=2, speculation="confidence")
    env["ASCEND_DSPARK_CACHE"] = str(tmp_path / "cache")
    with running_server(env, tmp_path / "server.log") as server:
        status, idle = server.json("GET", "/speculation", auth=False)
        assert status == 200
        assert idle["drafter_sleeps"] == 0                # the confidence policy's, none before any step
        costs = idle["step_costs"]
        assert costs["depths"] == [0, 1, 2, 3, 5, 7] and costs["batch_sizes"] == [1, 2]
        assert all(ms > 0 for row in costs["profiled_ms"] for ms in row) and len(costs["plain_profiled_ms"]) == 2
        client = server.client()
        client.completions.create(model=client.models.list().data[0].id, prompt="one two three", max_tokens=24,
                                  temperature=0, extra_body={"ignore_eos": True})
        server.wait_idle()
        _, busy = server.json("GET", "/speculation", auth=False)
        _, _, exposition = server.request("GET", "/metrics", auth=False)
    # the start-up collection before the freeze was timed (serving/gc_pauses.py)
    samples = {(s.name, s.labels.get("generation")): s.value for family in text_string_to_metric_families(
        exposition.decode()) for s in family.samples}
    assert samples[("ascend_dspark:gc_pause_seconds_count", "2")] >= 1
    measured = busy["step_costs"]
    steps = sum(map(sum, measured["measured_steps"])) + sum(measured["plain_measured_steps"])
    assert steps >= 20                           # 23 decode steps, the first one after the prefill unmeasured
    assert all((ms is None) == (n == 0) for row_ms, row_n in zip(measured["measured_ms"], measured["measured_steps"])
               for ms, n in zip(row_ms, row_n))
