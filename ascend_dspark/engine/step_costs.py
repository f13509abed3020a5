"""What a verify step costs on this device, per batch size and draft depth: the SPS curve
DSpark's scheduler trades expected tokens against (paper §3.2, SPS(B)).

Measured, never assumed: at start-up the model runner times greedy draft + verify steps
(graph replays where the engine has graphs, eager steps elsewhere, each with its host copy)
of its padding rows for every profiled batch size and depth. The table is cached on disk
per (device, torch, dtype, target and drafter shapes, depths, batch sizes, graphs), so a
server restart reuses it; `ASCEND_DSPARK_PROFILE=refresh` measures again.

The rows sit at context length 0, so attention over a long context is not in the figure;
for decode-sized batches the step is bound by reading the weights, which it does include.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ascend_dspark.models.gguf import cache_root

logger = logging.getLogger(__name__)

PROFILE_ENV = "ASCEND_DSPARK_PROFILE"
_FORMAT_VERSION = 1


@dataclass
class StepCosts:
    """`seconds[i][j]`: one step of `batch_sizes[i]` rows drafting and verifying `depths[j]`
    tokens each. `padded`: a batch runs as the smallest profiled batch size that holds it
    (graph buckets); otherwise costs are interpolated linearly between batch sizes."""

    batch_sizes: list[int]
    depths: list[int]
    seconds: list[list[float]]
    padded: bool
    device: str = ""

    def __post_init__(self) -> None:
        if sorted(self.batch_sizes) != self.batch_sizes or sorted(self.depths) != self.depths:
            raise ValueError("batch_sizes and depths must be sorted")
        if len(self.seconds) != len(self.batch_sizes) or any(len(r) != len(self.depths) for r in self.seconds):
            raise ValueError("seconds must be a batch_sizes x depths table")

    def step_seconds(self, batch: int, depth: int) -> float:
        """Seconds of one step of `batch` rows at `depth` drafts. Depths between profiled ones
        interpolate; batches past the largest profiled one grow in proportion to it."""
        sizes = self.batch_sizes
        if batch > sizes[-1]:
            return self._at(len(sizes) - 1, depth) * batch / sizes[-1]
        i = bisect.bisect_left(sizes, batch)
        if self.padded or sizes[i] == batch or i == 0:
            return self._at(i, depth)
        lo, hi = sizes[i - 1], sizes[i]
        w = (batch - lo) / (hi - lo)
        return (1 - w) * self._at(i - 1, depth) + w * self._at(i, depth)

    def steps_per_second(self, num_requests: int, num_tokens: int, depth: int) -> float:
        """SPS for the schedulers (spec/prefix_scheduler.py): a padded step's cost depends on
        the rows and the depth, not on how many of the padded tokens are verified."""
        return 1.0 / self.step_seconds(num_requests, depth)

    def _at(self, i: int, depth: int) -> float:
        row, depths = self.seconds[i], self.depths
        if depth >= depths[-1]:
            return row[-1]
        j = bisect.bisect_left(depths, depth)
        if depths[j] == depth or j == 0:
            return row[j]
        w = (depth - depths[j - 1]) / (depths[j] - depths[j - 1])
        return (1 - w) * row[j - 1] + w * row[j]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> StepCosts:
        return cls(**json.loads(text))


def profile_key(runner, batch_sizes: list[int], depths: list[int]) -> str:
    """What the step cost depends on: the device, torch, dtype, the models' shapes (not their
    weights), the graph buckets, the tensor-parallel size."""
    import torch
    parts = [_FORMAT_VERSION, runner.platform.describe(), torch.__version__, str(runner.dtype),
             repr(runner.target.config), repr(getattr(runner.drafter, "config", None)), batch_sizes, depths,
             runner.graph_runner is not None] + ([f"tp{runner.tp.size}"] if runner.tp is not None else [])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def measured_step_costs(runner, batch_sizes: list[int], depths: list[int], progress: bool = False) -> StepCosts:
    """The cached table for this runner, or a fresh profile (written to the cache)."""
    path = cache_root() / "step_costs" / f"{profile_key(runner, batch_sizes, depths)}.json"
    if path.exists() and os.environ.get(PROFILE_ENV) != "refresh":
        try:
            return StepCosts.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("step cost cache %s is unreadable (%s): profiling again", path, exc)
    costs = profile_step_costs(runner, batch_sizes, depths, progress)
    _write(path, costs)
    return costs


def profile_step_costs(runner, batch_sizes: list[int], depths: list[int], progress: bool = False,
                       repeats: int = 3) -> StepCosts:
    """Time each (batch size, depth) on the runner's padding rows: the median of `repeats`
    steps after one warm-up step."""
    keys = [(b, d) for b in batch_sizes for d in depths]
    table: dict[tuple[int, int], float] = {}
    for b, d in tqdm(keys, desc="profile step costs", disable=not progress, unit="shape"):
        table[(b, d)] = runner.time_step(b, d, repeats)
    seconds = [[table[(b, d)] for d in depths] for b in batch_sizes]
    costs = StepCosts(list(batch_sizes), list(depths), seconds, padded=runner.graph_runner is not None,
                      device=runner.platform.describe())
    logger.info("step costs on %s (ms; rows: batch %s, columns: depth %s): %s", costs.device, batch_sizes, depths,
                [[round(1e3 * s, 2) for s in row] for row in seconds])
    return costs


def _write(path: Path, costs: StepCosts) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(costs.to_json())
        tmp.replace(path)
    except OSError as exc:
        logger.warning("could not cache the step costs in %s (%s): the next start profiles again", path, exc)
