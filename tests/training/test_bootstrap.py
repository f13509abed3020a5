"""Bootstrap intervals of tau and of tau ratios over prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ascend_dspark.training.bootstrap import pooled_tau, ratio_interval, tau_interval


def test_identical_prompts_give_a_point_interval():
    lo, hi = tau_interval([6, 6, 6, 6], [3, 3, 3, 3])
    assert lo == hi == 2.0
    r = ratio_interval(([6, 9], [3, 3]), ([3, 6], [3, 4]))
    assert r["ratio"] == pytest.approx((15 / 6) / (9 / 7))


def test_interval_covers_pooled_tau_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    rounds = rng.integers(20, 60, size=400)
    committed = np.round(rounds * rng.uniform(1.5, 3.5, size=400))
    tau = committed.sum() / rounds.sum()
    lo, hi = tau_interval(committed, rounds)
    assert lo < tau < hi
    lo_small, hi_small = tau_interval(committed[:40], rounds[:40])
    assert hi_small - lo_small > 2 * (hi - lo)                 # ~sqrt(10) wider
    assert tau_interval(committed, rounds, seed=1) != (lo, hi)
    assert tau_interval(committed, rounds) == (lo, hi)          # seeded: reproducible


def test_paired_ratio_resolves_a_gap_unpaired_noise_would_hide():
    """Drafter a commits 10% more per round than b on every prompt, while prompts differ a
    lot: the paired ratio interval is tight around 1.1 and excludes 1."""
    rng = np.random.default_rng(1)
    rounds = rng.integers(10, 80, size=100).astype(float)
    base = rng.uniform(1.2, 4.0, size=100)
    b = (rounds * base, rounds)
    a = (rounds * base * 1.1, rounds)
    r = ratio_interval(a, b)
    assert r["ratio"] == pytest.approx(1.1)
    assert 1.09 < r["lo"] <= r["hi"] < 1.11 and r["p_le_1"] == 0.0
    same = ratio_interval(b, b)
    assert same["lo"] == same["hi"] == 1.0 and same["p_le_1"] == 1.0


def test_empty_and_mismatched():
    assert all(math.isnan(x) for x in tau_interval([], []))
    assert math.isnan(pooled_tau([], []))
    with pytest.raises(ValueError):
        tau_interval([1, 2], [1])
    with pytest.raises(ValueError, match="same prompts"):
        ratio_interval(([1, 2], [1, 1]), ([1], [1]))
