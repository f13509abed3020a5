"""Evaluation metrics of a draft, as pure functions of pooled `RequestStats`.

Speculation metrics follow DeepSpec's evaluator (`deepspec/eval/base_evaluator.py`):

- A *round* is one verify step. DeepSpec ends a round at an accepted stop token (EOS): it
  commits the drafts up to and including it, with no bonus token, and the round's
  proposal length becomes that count. Otherwise a round commits accepted drafts + 1
  bonus. Rounds that run past max_tokens count in full (DeepSpec does not trim them).
- **tau** = sum of committed tokens / number of rounds, pooled over every round of every
  request of a dataset: a round-weighted mean, *not* a mean of per-request means.
- **accept_rate@k** (k 0-based: @0 is the first draft) = #rounds with more than k
  accepted drafts / #rounds proposing more than k drafts: unconditional prefix survival.
- **verify_rate** = committed tokens / (drafts + 1), summed over rounds.

Ours (the DSpark paper's Fig. 2): **conditional acceptance** at position k = #rounds
accepting more than k drafts / #rounds that reached k (all k earlier drafts accepted) and
proposed it. With fixed-length proposals it is accept_rate@k / accept_rate@(k-1).

Calibration of the confidence head (`deepspec/eval/dspark/confidence_head.py`), two views:
- "survival" (DeepSpec's): at every proposed position k of a round (up to an accepted
  EOS), prediction prod_{i<=k} c_i, label "drafts 0..k all accepted".
- "conditional" (ours; c_k's own meaning, what the scheduler consumes): at every reached
  position, prediction c_k, label "draft k accepted".
Per position: ECE (20 equal-width bins, sum_b n_b/N |mean pred - mean label|), AUROC
(exact, rank-based, ties counted 1/2; DeepSpec approximates the same quantity with
1000-bin histograms) and Brier (mean squared error). The summary weights the
per-position values by their counts, as DeepSpec does (AUROC over positions where it is
defined, i.e. both labels occur).

Undefined values (no rounds, one class only) are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ascend_dspark.engine.outputs import RequestStats

NUM_BINS = 20
NAN = float("nan")


@dataclass(frozen=True)
class Round:
    """One verify step in DeepSpec's convention."""

    committed: int       # tokens the round adds
    accepted: int        # accepted drafts
    proposed: int        # drafts proposed


def rounds(stats: RequestStats) -> list[Round]:
    out = []
    for length, proposed, stop in zip(stats.accepted_lengths, stats.proposal_lengths, stats.stop_indices):
        accepted = length - 1
        if stop is not None and stop < accepted:          # an accepted draft is a stop token
            out.append(Round(stop + 1, stop + 1, stop + 1))
        else:
            out.append(Round(accepted + 1, accepted, proposed))
    return out


def tau(stats: RequestStats) -> float:
    """Mean committed tokens per round (bonus included), pooled over rounds."""
    rs = rounds(stats)
    return sum(r.committed for r in rs) / len(rs) if rs else NAN


def verify_rate(stats: RequestStats) -> float:
    rs = rounds(stats)
    return sum(r.committed for r in rs) / sum(r.proposed + 1 for r in rs) if rs else NAN


def mean_proposal_length(stats: RequestStats) -> float:
    rs = rounds(stats)
    return sum(r.proposed for r in rs) / len(rs) if rs else NAN


def num_positions(stats: RequestStats) -> int:
    return max(stats.proposal_lengths, default=0)


def accept_rates(stats: RequestStats) -> list[float]:
    """DeepSpec's accept_rate@k, k = 0 .. longest proposal - 1."""
    rs = rounds(stats)
    return [_ratio(sum(r.accepted > k for r in rs), sum(r.proposed > k for r in rs))
            for k in range(num_positions(stats))]


def conditional_acceptance(stats: RequestStats) -> list[float]:
    """P(draft k accepted | drafts < k accepted), k = 0 .. longest proposal - 1."""
    rs = rounds(stats)
    return [_ratio(sum(r.accepted > k for r in rs), sum(r.accepted >= k and r.proposed > k for r in rs))
            for k in range(num_positions(stats))]


def _ratio(num: float, den: float) -> float:
    return num / den if den else NAN


# -- calibration of the confidence head -------------------------------------------------------
def survival_pairs(stats: RequestStats) -> list[tuple[int, float, bool]]:
    """(position k, prod_{i<=k} c_i, drafts 0..k all accepted) for every proposed position."""
    out = []
    for r, conf in zip(rounds(stats), stats.confidences):
        survival = 1.0
        for k in range(r.proposed):
            survival *= conf[k]
            out.append((k, survival, k < r.accepted))
    return out


def conditional_pairs(stats: RequestStats) -> list[tuple[int, float, bool]]:
    """(position k, c_k, draft k accepted) for every reached position."""
    return stats.reached_confidences()


def ece(probs: Sequence[float], labels: Sequence[bool], num_bins: int = NUM_BINS) -> float:
    """Expected calibration error over equal-width bins (p = 1 falls in the last bin)."""
    bins = reliability(probs, labels, num_bins)
    total = sum(b["count"] for b in bins)
    return sum(b["count"] * abs(b["mean_pred"] - b["mean_label"]) for b in bins) / total if total else NAN


def reliability(probs: Sequence[float], labels: Sequence[bool], num_bins: int = NUM_BINS) -> list[dict]:
    """The non-empty bins: range, count, mean prediction, observed frequency."""
    count, pred, hit = [0] * num_bins, [0.0] * num_bins, [0.0] * num_bins
    for p, y in zip(probs, labels, strict=True):
        b = min(max(int(p * num_bins), 0), num_bins - 1)
        count[b] += 1
        pred[b] += p
        hit[b] += float(y)
    return [{"lo": b / num_bins, "hi": (b + 1) / num_bins, "count": count[b],
             "mean_pred": pred[b] / count[b], "mean_label": hit[b] / count[b]}
            for b in range(num_bins) if count[b]]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2.

    Mann-Whitney U from mid-ranks: sort once, give tied scores their average rank."""
    pairs = sorted(zip(scores, labels, strict=True), key=lambda t: t[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        mid_rank = (i + 1 + j) / 2                      # ranks i+1 .. j, averaged
        rank_sum += mid_rank * sum(1 for _, y in pairs[i:j] if y)
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def brier(probs: Sequence[float], labels: Sequence[bool]) -> float:
    if not probs:
        return NAN
    return sum((p - float(y)) ** 2 for p, y in zip(probs, labels, strict=True)) / len(probs)


def calibration_report(pairs: list[tuple[int, float, bool]], num_bins: int = NUM_BINS) -> dict:
    """Per-position ECE/AUROC/Brier, their count-weighted summary, pooled reliability bins."""
    by_pos: dict[int, tuple[list[float], list[bool]]] = {}
    for k, p, y in pairs:
        probs, labels = by_pos.setdefault(k, ([], []))
        probs.append(p)
        labels.append(y)
    per_position = []
    for k in sorted(by_pos):
        probs, labels = by_pos[k]
        per_position.append({"position": k, "count": len(probs), "ece": ece(probs, labels, num_bins),
                             "auroc": auroc(probs, labels), "brier": brier(probs, labels),
                             "mean_pred": sum(probs) / len(probs), "mean_label": sum(labels) / len(labels)})
    summary = {name: _weighted(per_position, name) for name in ("ece", "auroc", "brier", "mean_pred", "mean_label")}
    summary["count"] = len(pairs)
    return {"summary": summary, "per_position": per_position,
            "reliability": reliability([p for _, p, _ in pairs], [y for _, _, y in pairs], num_bins)}


def _weighted(per_position: list[dict], name: str) -> float:
    rows = [r for r in per_position if not math.isnan(r[name])]
    total = sum(r["count"] for r in rows)
    return sum(r["count"] * r[name] for r in rows) / total if total else NAN


def calibration(stats: RequestStats, num_bins: int = NUM_BINS) -> dict | None:
    """Both calibration views, or None when the drafter gave no confidences."""
    if not stats.confidences:
        return None
    return {"survival": calibration_report(survival_pairs(stats), num_bins),
            "conditional": calibration_report(conditional_pairs(stats), num_bins)}
