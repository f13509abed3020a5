"""The acceptance estimate the confidence policy plans with: conditional semantics (only
reached positions update), the per-request and engine-wide averages, the calibration ratio."""

from __future__ import annotations

import pytest

from ascend_dspark.spec.acceptance import AcceptanceEstimator, RequestAcceptance


def test_only_reached_positions_update():
    """2 of 4 accepted: positions 1 and 2 accepted, 3 rejected, 4 never reached."""
    est = AcceptanceEstimator(depth=4, prior=0.8, request_rate=0.1, engine_rate=0.5)
    state = RequestAcceptance()
    est.observe(state, num_accepted=2, verified=4, confidence=None)
    assert state.rates == pytest.approx([0.82, 0.82, 0.72, 0.8])
    assert est.engine == pytest.approx([0.9, 0.9, 0.4, 0.8])
    assert est.predict(state) == pytest.approx([0.82, 0.82, 0.72, 0.8])


def test_a_new_request_starts_from_the_engine_wide_rate():
    est = AcceptanceEstimator(depth=2, prior=0.8, request_rate=0.1, engine_rate=0.5)
    est.observe(RequestAcceptance(), num_accepted=0, verified=2, confidence=None)
    assert est.predict(RequestAcceptance()) == pytest.approx([0.4, 0.8])


def test_all_accepted_reaches_every_verified_position_and_no_further():
    est = AcceptanceEstimator(depth=3, prior=0.5, request_rate=1.0, engine_rate=0.0)
    state = RequestAcceptance()
    est.observe(state, num_accepted=2, verified=2, confidence=None)
    assert state.rates == [1.0, 1.0, 0.5]


def test_confidences_are_calibrated_and_blended():
    """The head says 0.4 where 0.8 is realised at position 1: calibration 2x; prediction
    0.7 * own rate + 0.3 * min(c * 2, 1)."""
    est = AcceptanceEstimator(depth=2, prior=0.8, request_rate=0.0, engine_rate=0.0, calibration_decay=1.0)
    state = RequestAcceptance()
    for accepted in (1, 1, 1, 1, 0):          # position 1 accepted 4 of 5 times, c_1 = 0.4 each time
        est.observe(state, num_accepted=accepted, verified=1, confidence=[0.4])
    assert est.calibration(0) == pytest.approx(0.8 / 0.4)
    assert est.calibration(1) == 1.0          # never observed
    assert est.predict(state) == pytest.approx([0.7 * 0.8 + 0.3 * 0.8, 0.8])


def test_a_step_without_drafts_keeps_the_last_confidences():
    est = AcceptanceEstimator(depth=2)
    state = RequestAcceptance()
    est.observe(state, num_accepted=1, verified=2, confidence=[0.9, 0.3])
    est.observe(state, num_accepted=0, verified=0, confidence=[])
    assert state.confidence == [0.9, 0.3]
