"""Confidence intervals for tau and for tau ratios: the percentile bootstrap over prompts.

tau pools rounds over a dataset (sum of committed tokens / number of rounds, `metrics.tau`),
so prompts are the independent units: a replicate draws n prompts with replacement and
pools their (committed, rounds). For a ratio of two drafters (DSpark / DFlash) the same
prompt draw serves both (a paired bootstrap: the prompts are the same, only the drafts
differ), which is what makes a 1.2x gap resolvable from a few hundred prompts.

Replicates are drawn with numpy's seeded generator, so an interval is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


def pooled_tau(committed: Sequence[float], rounds: Sequence[float]) -> float:
    total = float(np.sum(rounds))
    return float(np.sum(committed)) / total if total else float("nan")


def _draws(n: int, replicates: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def tau_interval(committed: Sequence[float], rounds: Sequence[float], replicates: int = REPLICATES,
                 level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """The percentile interval of pooled tau over prompts (per-prompt committed tokens and rounds)."""
    c, r = np.asarray(committed, dtype=np.float64), np.asarray(rounds, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 1:
        raise ValueError(f"committed and rounds must be equal-length 1-d sequences, got {c.shape} and {r.shape}")
    if c.size == 0:
        return float("nan"), float("nan")
    idx = _draws(c.size, replicates, seed)
    cs, rs = c[idx].sum(1), r[idx].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _interval(cs / rs, level)


def ratio_interval(a: tuple[Sequence[float], Sequence[float]], b: tuple[Sequence[float], Sequence[float]],
                   replicates: int = REPLICATES, level: float = LEVEL, seed: int = 0
                   ) -> dict[str, float]:
    """tau(a) / tau(b) over the same prompts (paired): {"ratio", "lo", "hi", "p_le_1"}, where
    p_le_1 is the share of replicates with a ratio <= 1 (a one-sided bootstrap p-value for
    "a beats b")."""
    ca, ra = (np.asarray(x, dtype=np.float64) for x in a)
    cb, rb = (np.asarray(x, dtype=np.float64) for x in b)
    if not (ca.shape == ra.shape == cb.shape == rb.shape) or ca.ndim != 1:
        raise ValueError("a ratio pairs the same prompts: both drafters need per-prompt values of equal length")
    ratio = pooled_tau(ca, ra) / pooled_tau(cb, rb)
    if ca.size == 0:
        return {"ratio": float("nan"), "lo": float("nan"), "hi": float("nan"), "p_le_1": float("nan")}
    idx = _draws(ca.size, replicates, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (ca[idx].sum(1) / ra[idx].sum(1)) / (cb[idx].sum(1) / rb[idx].sum(1))
    lo, hi = _interval(reps, level)
    finite = reps[np.isfinite(reps)]
    return {"ratio": float(ratio), "lo": lo, "hi": hi,
            "p_le_1": float(np.mean(finite <= 1.0)) if finite.size else float("nan")}
