"""What a verify step costs on this device, per batch size and draft depth: the SPS curve
DSpark's scheduler trades expected tokens against (paper §3.2, SPS(B)).

Measured, never assumed: at start-up the model runner times greedy draft + verify steps
(graph replays where the engine has graphs, eager steps elsewhere, each with its host copy)
of its padding rows for every profiled batch size and depth. The table is cached on disk
per (device, torch, dtype, target and drafter shapes, depths, batch sizes, graphs), so a
server restart reuses it; `ASCEND_DSPARK_PROFILE=refresh` measures again.

The rows sit at context length 0, so attention over a long context is not in the figure;
for decode-sized batches the step is bound by reading the weights, which it does include.
What the profile cannot see (the host's bookkeeping and streaming around a served step, the
prefill chunks between decode steps) the engine adds by `record`ing the steps it runs: a
cell that has been run is judged by the median of its last RECORDED wall times, and every
other cell by its profile plus the batch size's overhead, the median of what its recent steps
took beyond their profile (at any depth; a batch size without steps borrows the nearest
one's). Why the overhead: on a fast device the host's share of a served step is most of it
and barely depends on the depth (an H100 serving 64 requests: a plain step profiled at 1.4
ms, 5.6 ms measured; a depth-7 step 5.5 ms profiled, 9.7 ms measured), so a profile-only cell
makes a deep step look ~4x dearer than a plain one where it costs ~1.7x, and a policy that has
only measured plain steps at a batch size would never try drafting there.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ascend_dspark.models.gguf import cache_root

logger = logging.getLogger(__name__)

PROFILE_ENV = "ASCEND_DSPARK_PROFILE"
_FORMAT_VERSION = 2
RECORDED = 16                  # wall times kept per cell: the median shrugs off a rare stall
OVERHEAD_RECORDED = 64         # residuals (wall - profile) kept per batch size, over all its cells


@dataclass
class StepCosts:
    """`seconds[i][j]`: one step of `batch_sizes[i]` rows drafting and verifying `depths[j]`
    tokens each (at depth 0 the drafter still reads the committed tokens). `plain_seconds[i]`:
    a plain decoding step of `batch_sizes[i]` rows, the drafter asleep (None: not measured;
    depth 0 then costs `seconds[i][0]`). `padded`: a batch runs as the smallest profiled batch
    size that holds it (graph buckets); otherwise costs are interpolated linearly between
    batch sizes."""

    batch_sizes: list[int]
    depths: list[int]
    seconds: list[list[float]]
    padded: bool
    device: str = ""
    plain_seconds: list[float] | None = None

    def __post_init__(self) -> None:
        if sorted(self.batch_sizes) != self.batch_sizes or sorted(self.depths) != self.depths:
            raise ValueError("batch_sizes and depths must be sorted")
        if len(self.seconds) != len(self.batch_sizes) or any(len(r) != len(self.depths) for r in self.seconds):
            raise ValueError("seconds must be a batch_sizes x depths table")
        if self.plain_seconds is not None and len(self.plain_seconds) != len(self.batch_sizes):
            raise ValueError("plain_seconds must have one entry per batch size")
        # Wall times of steps really run, per (batch index, depth, plain), and what they took
        # beyond their profiled cell, per batch index: see `record`.
        self._recorded: dict[tuple[int, int, bool], deque[float]] = {}
        self._overhead: dict[int, deque[float]] = {}

    def step_seconds(self, batch: int, depth: int, plain: bool = False) -> float:
        """Seconds of one step of `batch` rows at `depth` drafts (`plain`: depth 0 with the
        drafter asleep). Depths between profiled ones interpolate; batches past the largest
        profiled one grow in proportion to it."""
        sizes = self.batch_sizes
        if batch > sizes[-1]:
            return self._at(len(sizes) - 1, depth, plain) * batch / sizes[-1]
        i = bisect.bisect_left(sizes, batch)
        if self.padded or sizes[i] == batch or i == 0:
            return self._at(i, depth, plain)
        lo, hi = sizes[i - 1], sizes[i]
        w = (batch - lo) / (hi - lo)
        return (1 - w) * self._at(i - 1, depth, plain) + w * self._at(i, depth, plain)

    def steps_per_second(self, num_requests: int, num_tokens: int, depth: int) -> float:
        """SPS for the schedulers (spec/prefix_scheduler.py): a padded step's cost depends on
        the rows and the depth, not on how many of the padded tokens are verified. Depth 0 is
        plain decoding's cost where it is known: what a run of depth-0 steps costs once the
        drafter sleeps (engine/speculation.py)."""
        return 1.0 / self.step_seconds(num_requests, depth, plain=depth == 0)

    def record(self, batch: int, depth: int, seconds: float, plain: bool = False) -> None:
        """A step the engine ran: `batch` rows at `depth` took `seconds` of wall time. Kept
        where the step ran as a profiled cell (its graph bucket, or an exact profiled batch
        size and depth); from then on the cell costs the median of its last RECORDED times."""
        sizes = self.batch_sizes
        i = bisect.bisect_left(sizes, batch)
        if i == len(sizes) or not (self.padded or sizes[i] == batch) or depth not in self.depths:
            return
        key = (i, depth, plain and depth == 0)
        self._recorded.setdefault(key, deque(maxlen=RECORDED)).append(seconds)
        profiled = self._profiled(i, self.depths.index(depth), key[2])
        self._overhead.setdefault(i, deque(maxlen=OVERHEAD_RECORDED)).append(seconds - profiled)

    def overhead(self, batch: int) -> float:
        """Seconds a served step of `batch` rows takes beyond its profile: the median residual
        of the recent steps of its batch size (of the nearest batch size with steps, the larger
        on a tie, if it has none); 0 before any step, and never below 0 (the profile is the
        device's own time)."""
        if not self._overhead:
            return 0.0
        i = min(bisect.bisect_left(self.batch_sizes, batch), len(self.batch_sizes) - 1)
        nearest = min(self._overhead, key=lambda k: (abs(k - i), -k))
        return max(0.0, statistics.median(self._overhead[nearest]))

    def recorded(self, batch: int, depth: int, plain: bool = False) -> list[float]:
        """The wall times recorded for the cell a step of `batch` rows at `depth` runs in."""
        i = min(bisect.bisect_left(self.batch_sizes, batch), len(self.batch_sizes) - 1)
        return list(self._recorded.get((i, depth, plain and depth == 0), ()))

    def table(self) -> dict:
        """Profiled and measured milliseconds per (batch size, depth), and how many steps each
        measured cell holds (None: never run), for people reading what the policy sees."""
        def measured(i: int, depth: int, plain: bool) -> tuple[float | None, int]:
            times = list(self._recorded.get((i, depth, plain), ()))
            return (round(1e3 * statistics.median(times), 3) if times else None), len(times)
        rows = range(len(self.batch_sizes))
        cells = [[measured(i, d, False) for d in self.depths] for i in rows]
        plain = [measured(i, 0, True) for i in rows]
        overhead = [round(1e3 * self.overhead(b), 3) if self._overhead else None for b in self.batch_sizes]
        return {"batch_sizes": self.batch_sizes, "depths": self.depths, "device": self.device,
                "profiled_ms": [[round(1e3 * s, 3) for s in row] for row in self.seconds],
                "measured_ms": [[m for m, _ in row] for row in cells],
                "measured_steps": [[n for _, n in row] for row in cells],
                "plain_profiled_ms": [round(1e3 * s, 3) for s in self.plain_seconds] if self.plain_seconds else None,
                "plain_measured_ms": [m for m, _ in plain], "plain_measured_steps": [n for _, n in plain],
                "overhead_ms": overhead}

    def _cell(self, i: int, j: int, plain: bool) -> float:
        times = self._recorded.get((i, self.depths[j], plain))
        if times:
            return statistics.median(times)
        if plain and self.plain_seconds is None:
            return self._cell(i, j, False)
        return self._profiled(i, j, plain) + self.overhead(self.batch_sizes[i])

    def _profiled(self, i: int, j: int, plain: bool) -> float:
        if plain and self.plain_seconds is not None:
            return self.plain_seconds[i]
        return self.seconds[i][j]

    def _at(self, i: int, depth: int, plain: bool = False) -> float:
        depths = self.depths
        if depth >= depths[-1]:
            return self._cell(i, len(depths) - 1, False)
        j = bisect.bisect_left(depths, depth)
        if depths[j] == depth or j == 0:
            return self._cell(i, j, plain and depths[j] == 0)
        w = (depth - depths[j - 1]) / (depths[j] - depths[j - 1])
        return (1 - w) * self._cell(i, j - 1, False) + w * self._cell(i, j, False)

    def to_json(self) -> str:
        """The profiled table (the steps recorded since belong to this process, never cached)."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> StepCosts:
        return cls(**json.loads(text))


def profile_batch_sizes(graph_buckets: list[int], max_batch_size: int) -> list[int]:
    """The batch sizes whose step cost is profiled: the graph buckets, or without graphs 1, 4,
    16, 64 below the largest batch and that batch itself (at most 256): an eager step's cost
    is close to linear in the rows between them, and each profiled size costs start-up time."""
    if graph_buckets:
        return list(graph_buckets)
    top = min(max_batch_size, 256)
    return [b for b in (1, 4, 16, 64) if b < top] + [top]


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
    plain = None
    if runner.drafter is not None and 0 in depths:          # depth 0 with the drafter asleep
        plain = [runner.time_step(b, 0, repeats, observe=False) for b in batch_sizes]
    costs = StepCosts(list(batch_sizes), list(depths), seconds, padded=runner.graph_runner is not None,
                      device=runner.platform.describe(), plain_seconds=plain)
    logger.info("step costs on %s (ms; rows: batch %s, columns: depth %s): %s; plain decoding: %s", costs.device,
                batch_sizes, depths, [[round(1e3 * s, 2) for s in row] for row in seconds],
                [round(1e3 * s, 2) for s in plain] if plain else "not measured")
    return costs


def _write(path: Path, costs: StepCosts) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(costs.to_json())
        tmp.replace(path)
    except OSError as exc:
        logger.warning("could not cache the step costs in %s (%s): the next start profiles again", path, exc)
