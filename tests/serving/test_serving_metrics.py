"""The server's speculation counters: verified depths per request-step, and the confidence
head's calibration over the recent reached positions (computed here by hand)."""

from __future__ import annotations

import pytest

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
