"""Evaluation metrics against hand-computed examples, closed forms and brute force.

Statistical checks (ECE of calibrated data, AUROC of uninformative scores) each come with
a negative control that the metric must flag.
"""

from __future__ import annotations

import math
import random

import pytest

from ascend_dspark.engine.outputs import RequestStats, merge_stats
from ascend_dspark.training import metrics as M


def four_rounds() -> RequestStats:
    s = RequestStats()
    s.record(3, 3)                  # all accepted: 3 + bonus
    s.record(1, 3)                  # draft 1 rejected
    s.record(0, 3)                  # draft 0 rejected
    s.record(2, 3, stop_index=1)    # drafts 0, 1 accepted, draft 1 is EOS: 2 tokens, no bonus
    return s


def test_rounds_follow_deepspecs_eos_convention():
    assert M.rounds(four_rounds()) == [M.Round(4, 3, 3), M.Round(2, 1, 3), M.Round(1, 0, 3), M.Round(2, 2, 2)]


def test_tau_pools_rounds_and_drops_the_bonus_after_an_accepted_eos():
    s = four_rounds()
    assert M.tau(s) == pytest.approx(9 / 4)
    assert s.mean_accepted_length == pytest.approx(10 / 4)          # the engine's own count keeps the bonus
    # Pooled over rounds, not a mean of per-request means: 1 request of 1 round + 1 of 3 rounds.
    a, b = RequestStats(), RequestStats()
    a.record(3, 3)
    for n in (0, 0, 0):
        b.record(n, 3)
    assert M.tau(merge_stats([a, b])) == pytest.approx((4 + 1 + 1 + 1) / 4)
    assert math.isnan(M.tau(RequestStats()))


def test_accept_rates_are_unconditional_and_conditional_is_per_reached_position():
    s = four_rounds()
    assert M.accept_rates(s) == pytest.approx([3 / 4, 2 / 4, 1 / 3])
    assert M.conditional_acceptance(s) == pytest.approx([3 / 4, 2 / 3, 1 / 1])
    assert M.verify_rate(s) == pytest.approx(9 / 15)
    assert M.mean_proposal_length(s) == pytest.approx(11 / 4)


def test_conditional_is_the_ratio_of_survivals_for_fixed_length_proposals():
    rng = random.Random(0)
    s = RequestStats()
    for _ in range(500):
        s.record(min(int(rng.expovariate(0.4)), 5), 5)
    survival = M.accept_rates(s)
    cond = M.conditional_acceptance(s)
    assert cond[0] == pytest.approx(survival[0])
    for k in range(1, 5):
        assert cond[k] == pytest.approx(survival[k] / survival[k - 1])
    assert cond == pytest.approx(s.acceptance_per_position)           # the engine's own counters agree


def test_auroc_closed_forms_and_a_hand_example_with_ties():
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert M.auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # positives {0.3, 0.5}, negatives {0.5, 0.1}: pairs 0 + 1 + 1/2 + 1 = 2.5 of 4
    assert M.auroc([0.3, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.625)
    assert math.isnan(M.auroc([0.2, 0.7], [1, 1]))


def test_auroc_equals_the_pairwise_definition():
    rng = random.Random(1)
    scores = [round(rng.random(), 1) for _ in range(200)]               # many ties
    labels = [rng.random() < s for s in scores]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert M.auroc(scores, labels) == pytest.approx(brute)


def test_auroc_of_uninformative_scores_is_one_half_and_informative_ones_are_not():
    rng = random.Random(2)
    labels = [rng.random() < 0.5 for _ in range(4000)]
    noise = [rng.random() for _ in labels]
    informative = [0.6 * y + 0.4 * rng.random() for y in labels]
    assert M.auroc(noise, labels) == pytest.approx(0.5, abs=0.03)
    assert M.auroc(informative, labels) > 0.9                          # negative control


def test_ece_hand_example_and_the_last_bin():
    # bins 2 and 18: |0.1 - 0.5| * 2 + |0.9 - 1| * 2 over 4
    assert M.ece([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx(0.25)
    assert M.ece([1.0, 1.0], [1, 1]) == 0.0
    assert M.reliability([1.0, 0.0], [1, 0]) == [
        {"lo": 0.0, "hi": 0.05, "count": 1, "mean_pred": 0.0, "mean_label": 0.0},
        {"lo": 0.95, "hi": 1.0, "count": 1, "mean_pred": 1.0, "mean_label": 1.0}]


def test_ece_of_calibrated_data_is_small_and_of_shifted_data_is_not():
    rng = random.Random(3)
    probs = [rng.random() for _ in range(20000)]
    calibrated = [rng.random() < p for p in probs]
    shifted = [rng.random() < max(0.0, p - 0.15) for p in probs]
    assert M.ece(probs, calibrated) < 0.02
    # negative control; closed form: E|p - max(0, p - 0.15)| = 0.15 - 0.15^2 / 2 for p ~ U(0, 1)
    assert M.ece(probs, shifted) == pytest.approx(0.15 - 0.15 ** 2 / 2, abs=0.02)


def test_brier_hand_example():
    assert M.brier([0.8, 0.3], [1, 0]) == pytest.approx((0.04 + 0.09) / 2)
    assert M.brier([0.5] * 4, [0, 1, 1, 0]) == 0.25


def confident_rounds() -> RequestStats:
    s = RequestStats()
    s.record(2, 3, [0.5, 0.5, 0.5])
    s.record(0, 3, [0.25, 1.0, 0.5])
    s.record(2, 3, [0.5, 0.5, 0.5], stop_index=0)        # EOS is draft 0: one proposed position
    return s


def test_calibration_pairs_both_views():
    s = confident_rounds()
    assert M.survival_pairs(s) == [(0, 0.5, True), (1, 0.25, True), (2, 0.125, False),
                                   (0, 0.25, False), (1, 0.25, False), (2, 0.125, False),
                                   (0, 0.5, True)]
    assert M.conditional_pairs(s) == [(0, 0.5, True), (1, 0.5, True), (2, 0.5, False),
                                      (0, 0.25, False),
                                      (0, 0.5, True)]


def test_calibration_summary_weights_positions_by_count():
    report = M.calibration(confident_rounds())["survival"]
    pos = {r["position"]: r for r in report["per_position"]}
    assert [pos[k]["count"] for k in range(3)] == [3, 2, 2]
    assert pos[0]["brier"] == pytest.approx((0.25 + 0.0625 + 0.25) / 3) and pos[0]["auroc"] == 1.0
    assert pos[1]["auroc"] == 0.5 and math.isnan(pos[2]["auroc"])
    squared = [(p - y) ** 2 for _, p, y in M.survival_pairs(confident_rounds())]
    assert report["summary"]["brier"] == pytest.approx(sum(squared) / 7)        # = the pooled Brier
    assert report["summary"]["auroc"] == pytest.approx((3 * 1.0 + 2 * 0.5) / 5)   # defined positions only
    assert report["summary"]["count"] == 7
    assert sum(b["count"] for b in report["reliability"]) == 7


def test_no_confidences_no_calibration():
    assert M.calibration(four_rounds()) is None
