"""What generation returns: tokens, text, why it stopped, and speculation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    """Per-request speculation statistics: one entry per verify step (round).

    `accepted_lengths[i]` counts the tokens committed by verify step i *including* the
    bonus/correction token (the paper's tau), so plain decoding gives exactly 1.0.
    `position_reached[k]` / `position_accepted[k]` count how often draft position k was
    verified with all earlier drafts accepted, and how often it was then accepted: their
    ratio is the conditional acceptance at position k (DSpark paper, Fig. 2).

    The raw facts below let `ascend_dspark.training.metrics` recompute DeepSpec's own
    conventions (which differ from the engine's at an accepted EOS) and calibrate the
    confidence head:
    - `proposal_lengths[i]`: drafts verified in step i.
    - `stop_indices[i]`: index, in step i's committed tokens [accepted drafts..., bonus], of
      the first stop token (EOS / stop token id), else None. DeepSpec ends a round at an
      accepted EOS draft and gives it no bonus, so tau needs to know where that was.
    - `confidences[i]`: the drafter's c_1..c_K for step i's verified drafts, all of them
      (not only the reached ones: DeepSpec's prefix-survival calibration multiplies c's
      past the first rejection too). Empty when the drafter gives no confidences.
      `reached_confidences()` is the conditional view: (position, c_k, accepted) for the
      positions whose earlier drafts were all accepted.
    """

    accepted_lengths: list[int] = field(default_factory=list)
    position_reached: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    proposal_lengths: list[int] = field(default_factory=list)
    stop_indices: list[int | None] = field(default_factory=list)
    confidences: list[list[float]] = field(default_factory=list)

    def record(self, num_accepted: int, verified: int, confidence: list[float] | None = None,
               stop_index: int | None = None) -> None:
        if confidence is not None and len(confidence) != verified:
            raise ValueError(f"{len(confidence)} confidences for {verified} verified drafts")
        if confidence is None and self.confidences:
            raise ValueError("a step without confidences after steps with them")
        if confidence is not None and len(self.confidences) != len(self.accepted_lengths):
            raise ValueError("a step with confidences after steps without them")
        self.accepted_lengths.append(num_accepted + 1)
        self.proposal_lengths.append(verified)
        self.stop_indices.append(stop_index)
        if confidence is not None:
            self.confidences.append(list(confidence))
        if len(self.position_reached) < verified:
            grow = verified - len(self.position_reached)
            self.position_reached += [0] * grow
            self.position_accepted += [0] * grow
        for k in range(min(num_accepted + 1, verified)):
            self.position_reached[k] += 1
            if k < num_accepted:
                self.position_accepted[k] += 1

    @property
    def num_steps(self) -> int:
        return len(self.accepted_lengths)

    @property
    def mean_accepted_length(self) -> float:
        return sum(self.accepted_lengths) / max(1, len(self.accepted_lengths))

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / r if r else 0.0 for a, r in zip(self.position_accepted, self.position_reached)]

    def reached_confidences(self) -> list[tuple[int, float, bool]]:
        """(draft position k, c_k, accepted) for every reached position of every step.

        Reached: all earlier drafts of the step were accepted. Positions after an accepted
        stop token are not reached (the request ended there; DeepSpec skips them too)."""
        out = []
        for n, conf, stop in zip(self.accepted_lengths, self.confidences, self.stop_indices):
            n -= 1
            last = min(n, len(conf) - 1)
            if stop is not None and stop < n:
                last = stop
            out += [(k, conf[k], k < n) for k in range(last + 1)]
        return out


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str                  # "stop" (EOS / stop string / stop token) or "length"
    stats: RequestStats
    text: str | None = None
    prompt: str | None = None
    # With SamplingParams.prompt_logprobs: (logprob, [(id, logprob) x top-n]) of each prompt token after the first.
    prompt_logprobs: list | None = None


def merge_stats(stats: list[RequestStats]) -> RequestStats:
    """Pool several requests' statistics (a batch summary, or a dataset for the metrics)."""
    out = RequestStats()
    with_conf = [bool(s.confidences) for s in stats if s.num_steps]
    if any(with_conf) and not all(with_conf):
        raise ValueError("cannot pool requests with confidences and requests without them")
    for s in stats:
        out.accepted_lengths += s.accepted_lengths
        out.proposal_lengths += s.proposal_lengths
        out.stop_indices += s.stop_indices
        out.confidences += s.confidences
        width = max(len(out.position_reached), len(s.position_reached))
        out.position_reached = [a + b for a, b in zip(_pad(out.position_reached, width), _pad(s.position_reached, width))]
        out.position_accepted = [a + b for a, b in zip(_pad(out.position_accepted, width), _pad(s.position_accepted, width))]
    return out


def _pad(xs: list[int], width: int) -> list[int]:
    return xs + [0] * (width - len(xs))
