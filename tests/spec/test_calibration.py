"""The confidence head's temperature scaling: the transform by hand, the fit recovering the
temperature that generated synthetic data (and 1 where the data are calibrated), the file
round trip with a clear error for a bad one, the loader attaching it, the estimator using it."""

from __future__ import annotations


import pytest
import torch

from ascend_dspark.drafters import create_drafter, load_drafter
from ascend_dspark.drafters.native import save_drafter
from ascend_dspark.spec.acceptance import AcceptanceEstimator, RequestAcceptance
from ascend_dspark.spec.calibration import (
    CALIBRATION_FILE,
    fit_per_position,
    fit_temperature,
    read_temperatures,
    scale,
    write_temperatures,
)
from tests.helpers import tiny_target


def test_scale_by_hand():
    assert scale(0.5, 3.0) == pytest.approx(0.5)
    assert scale(0.8, 1.0) == pytest.approx(0.8)
    # logit(0.8) = log 4; halved: sigmoid(log 2) = 2/3
    assert scale(0.8, 2.0) == pytest.approx(2 / 3)
    assert scale(0.2, 0.5) == pytest.approx(1 / 17)        # logit doubled: 1 / (1 + 16)


def synthetic(true_t: float, n: int = 20_000, seed: int = 0):
    """Head outputs p = sigmoid(z); labels drawn with probability sigmoid(z / true_t)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen, dtype=torch.float64) * 2.0
    labels = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(z / true_t)
    return torch.sigmoid(z).tolist(), labels.tolist()


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_the_generating_temperature(true_t):
    probs, labels = synthetic(true_t)
    assert fit_temperature(probs, labels) == pytest.approx(true_t, rel=0.08)


def test_calibrated_data_fit_to_one():
    probs, labels = synthetic(1.0)
    assert fit_temperature(probs, labels) == pytest.approx(1.0, rel=0.05)


def test_per_position_fit_and_sparse_positions():
    over, y_over = synthetic(2.0, n=4000, seed=1)
    pairs = [(0, p, y) for p, y in zip(over, y_over)] + [(2, 0.5, True)] * 10     # position 2: too few
    temps = fit_per_position(pairs, depth=3)
    assert temps[0] == pytest.approx(2.0, rel=0.15)
    assert temps[1] == temps[0] == temps[2]          # no data at 1, too little at 2: the last fitted one


def test_file_round_trip_and_bad_files(tmp_path):
    assert read_temperatures(tmp_path) is None
    write_temperatures(tmp_path, [1.5, 0.8], {"ece_before": 0.1})
    assert read_temperatures(tmp_path) == [1.5, 0.8]
    (tmp_path / CALIBRATION_FILE).write_text('{"temperatures": [1.0, -2]}')
    with pytest.raises(ValueError, match="positive"):
        read_temperatures(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_text("[]")
    with pytest.raises(ValueError, match="not a calibration file"):
        read_temperatures(tmp_path)


def test_the_loader_attaches_the_temperatures(tmp_path):
    target, _ = tiny_target("llama", dtype=torch.float32)
    path = save_drafter(create_drafter("dspark", target), tmp_path / "draft")
    assert load_drafter(path, target).confidence_temperatures is None
    write_temperatures(path, [2.0] * 7, {})
    assert load_drafter(path, target).confidence_temperatures == [2.0] * 7


def test_the_estimator_scales_confidences_before_blending():
    est = AcceptanceEstimator(depth=1, prior=0.5, request_rate=0.0, engine_rate=0.0, temperatures=[2.0])
    state = RequestAcceptance()
    est.observe(state, num_accepted=1, verified=1, confidence=[0.8])
    # calibration ratio: realised 1 over the scaled 2/3 -> 1.5; prediction 0.7 * 0.5 + 0.3 * min(2/3 * 1.5, 1)
    assert est.calibration(0) == pytest.approx(1.5)
    assert est.predict(state) == pytest.approx([0.7 * 0.5 + 0.3 * 1.0])
