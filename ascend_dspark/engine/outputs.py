"""What generation returns: tokens, text, why it stopped, and speculation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    """Per-request speculation statistics.

    `accepted_lengths[i]` counts the tokens committed by verify step i *including* the
    bonus/correction token (the paper's tau), so plain decoding gives exactly 1.0.
    `position_reached[k]` / `position_accepted[k]` count how often draft position k was
    verified with all earlier drafts accepted, and how often it was then accepted: their
    ratio is the conditional acceptance at position k (DSpark paper, Fig. 2).
    """

    accepted_lengths: list[int] = field(default_factory=list)
    position_reached: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)

    def record(self, num_accepted: int, verified: int) -> None:
        self.accepted_lengths.append(num_accepted + 1)
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


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str                  # "stop" (EOS / stop string / stop token) or "length"
    stats: RequestStats
    text: str | None = None
    prompt: str | None = None


def merge_stats(stats: list[RequestStats]) -> RequestStats:
    """Pool several requests' statistics (for a batch-level summary line)."""
    out = RequestStats()
    for s in stats:
        out.accepted_lengths += s.accepted_lengths
        width = max(len(out.position_reached), len(s.position_reached))
        out.position_reached = [a + b for a, b in zip(_pad(out.position_reached, width), _pad(s.position_reached, width))]
        out.position_accepted = [a + b for a, b in zip(_pad(out.position_accepted, width), _pad(s.position_accepted, width))]
    return out


def _pad(xs: list[int], width: int) -> list[int]:
    return xs + [0] * (width - len(xs))
