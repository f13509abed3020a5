"""Temperature scaling of DSpark's confidence head, one temperature per draft position.

The head's c_k estimates P(draft k accepted | drafts 1..k-1 accepted). Trained on the
drafter's data, it is over- or under-confident on real traffic (BENCHMARKS.md: somewhat
over-confident at T=1), and the confidence scheduler multiplies c's, so a bias compounds
with depth. Sequential temperature scaling (the DSpark paper's calibration) rescales each
position's logit: c'_k = sigmoid(logit(c_k) / T_k), with T_k fitted on held-in traffic at the
positions that were reached (all earlier drafts accepted), position by position, so each
T_k is fitted on the conditional event it predicts. A temperature never reorders the c's of
one position (AUROC unchanged); it only moves them towards or away from 1/2.

`ascend-dspark calibrate` (training/calibrate.py) fits them and writes `calibration.json`
into the draft directory; the drafter loader reads it back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

CALIBRATION_FILE = "calibration.json"
_EPS = 1e-6
_LOG_T_RANGE = (-3.0, 3.0)          # T in [0.05, 20]


def scale(c: float, temperature: float) -> float:
    """sigmoid(logit(c) / T)."""
    c = min(max(c, _EPS), 1 - _EPS)
    return 1.0 / (1.0 + math.exp(-math.log(c / (1 - c)) / temperature))


def fit_temperature(probs: Sequence[float], labels: Sequence[bool]) -> float:
    """The T minimising the log loss of sigmoid(logit(p) / T) against the labels (a convex
    problem in 1/T; golden-section search over log T)."""
    if not probs:
        return 1.0
    p = torch.tensor(probs, dtype=torch.float64).clamp(_EPS, 1 - _EPS)
    z, y = torch.log(p / (1 - p)), torch.tensor(labels, dtype=torch.float64)

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.binary_cross_entropy_with_logits(z / math.exp(log_t), y))

    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def fit_per_position(pairs: Sequence[tuple[int, float, bool]], depth: int, min_count: int = 50) -> list[float]:
    """T_1..T_depth from (position k (0-based), c_k, accepted) at reached positions; a
    position with fewer than `min_count` pairs keeps the last fitted temperature (1 at first)."""
    temperatures, last = [], 1.0
    for k in range(depth):
        probs = [c for pos, c, _ in pairs if pos == k]
        labels = [y for pos, _, y in pairs if pos == k]
        if len(probs) >= min_count:
            last = fit_temperature(probs, labels)
        temperatures.append(last)
    return temperatures


def read_temperatures(draft_dir: str | Path) -> list[float] | None:
    """The draft's fitted temperatures, or None if it was never calibrated."""
    path = Path(draft_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        temperatures = [float(t) for t in json.loads(path.read_text())["temperatures"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a calibration file ({exc}); delete it or run `ascend-dspark calibrate`") from None
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ValueError(f"{path}: temperatures must be positive, got {temperatures}")
    return temperatures


def write_temperatures(draft_dir: str | Path, temperatures: list[float], report: dict) -> Path:
    path = Path(draft_dir) / CALIBRATION_FILE
    path.write_text(json.dumps({"temperatures": temperatures, **report}, indent=1) + "\n")
    return path
