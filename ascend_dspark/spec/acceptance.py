"""Predicted acceptance of each request's next drafts, from what the host already knows.

The confidence scheduler (prefix_scheduler.py) needs c_{r,k}, the probability that request
r's draft k is accepted given that drafts 1..k-1 were, *before* the step runs: the step's
depth is chosen when it is launched, from results already read (one step old, two under
overlap), so that nothing the step samples can influence it (lossless by construction).

The estimate, per position k:
- engine-wide: a slow moving average of realised conditional acceptance over every
  request (the prior for a request's first steps, and for drafters that give nothing else);
- per request: a faster moving average of its own realised acceptance, started from the
  engine-wide value (text that drafts well keeps drafting well);
- with a confidence head (DSpark): the request's latest read confidences, scaled by the
  draft's fitted temperatures where it has them (spec/calibration.py), calibrated online
  by the ratio of realised acceptance to predicted confidence at that position over every
  request, weighted 0.3 against the request's own rate 0.7.

The weights come from the shipped SmolLM2 drafts on 24 held-out prompts (this CPU, T=0,
K = 7): the Brier score of the next step's realised conditional acceptance was 0.245 for the
engine-wide average, 0.241 for the per-request one (rate 0.1), 0.257 for the last step's
calibrated confidences alone and 0.236 for the 0.7 / 0.3 blend; the *current* step's own
confidences score 0.198, but they exist only after the drafts were sampled, too late for a
depth that must not depend on them.
Realised acceptance at k is observed only where k was reached (all earlier drafts accepted),
which is what a conditional probability needs.

`prior` is the assumed conditional acceptance before anything was observed: optimistic on
purpose, so a fresh engine speculates and measures instead of never trying.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .calibration import scale


@dataclass
class RequestAcceptance:
    """One request's side of the estimate (lives on the request)."""

    rates: list[float] = field(default_factory=list)        # per position, moving average
    confidence: list[float] | None = None                   # the latest read step's c_1..c_L


class AcceptanceEstimator:
    def __init__(self, depth: int, prior: float = 0.8, request_rate: float = 0.1,
                 engine_rate: float = 0.02, calibration_decay: float = 0.999,
                 temperatures: list[float] | None = None) -> None:
        """`temperatures`: the draft's fitted per-position temperatures (spec/calibration.py),
        applied to every confidence before the online ratio corrects what is left."""
        self.depth = depth
        self.temperatures = temperatures
        self.engine = [prior] * depth
        self.request_rate = request_rate
        self.engine_rate = engine_rate
        self.decay = calibration_decay
        self._predicted = [0.0] * depth        # decayed sums over reached positions: confidence ...
        self._realised = [0.0] * depth         # ... and acceptance, for the calibration ratio

    def observe(self, state: RequestAcceptance, num_accepted: int, verified: int,
                confidence: list[float] | None) -> None:
        """A read verify step: `num_accepted` of `verified` drafts accepted; `confidence`: the
        drafter's c_1..c_verified for them (None without a confidence head)."""
        if not state.rates:
            state.rates = list(self.engine)
        if confidence:
            confidence = self._scaled(confidence)
        for k in range(min(num_accepted + 1, verified, self.depth)):
            accepted = 1.0 if k < num_accepted else 0.0
            self.engine[k] += self.engine_rate * (accepted - self.engine[k])
            state.rates[k] += self.request_rate * (accepted - state.rates[k])
            if confidence is not None:
                self._predicted[k] = self.decay * self._predicted[k] + confidence[k]
                self._realised[k] = self.decay * self._realised[k] + accepted
        if confidence:
            state.confidence = list(confidence)

    def predict(self, state: RequestAcceptance) -> list[float]:
        """Conditional acceptance of the request's next drafts 1..depth."""
        rates = state.rates or self.engine
        out = []
        for k in range(self.depth):
            c = rates[k]
            if state.confidence is not None and k < len(state.confidence):
                c = 0.7 * c + 0.3 * min(state.confidence[k] * self.calibration(k), 1.0)
            out.append(c)
        return out

    def _scaled(self, confidence: list[float]) -> list[float]:
        if self.temperatures is None:
            return confidence
        ts = self.temperatures
        return [scale(c, ts[min(k, len(ts) - 1)]) for k, c in enumerate(confidence)]

    def calibration(self, k: int) -> float:
        """Realised acceptance over predicted confidence at position k (1 until observed)."""
        if self._predicted[k] <= 0:
            return 1.0
        return min(self._realised[k] / self._predicted[k], 2.0)
