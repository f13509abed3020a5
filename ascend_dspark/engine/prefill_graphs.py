"""Prompt chunks replayed from captured device graphs, in (rows, width) buckets.

Why: an eager prefill is one padded forward of ~200 small kernels that the host issues one
by one (~22 ms of host time per step on an H200 for a 135M model, far more than the device
needs), so every step carrying a prompt chunk waits on the host, and at high concurrency
those steps dominate time to first token and throughput. Replayed from a graph, the whole
prefill (the target's forward, the first token's sampling, the drafter's observe, the new
cache lengths and anchors: `ModelRunner.prefill_core`) is one launch, as decode steps
already are (graph_runner.py). CUDA and NPU graphs alike, through `platform.graph(pool)`.

- Shapes: one graph per (rows bucket, width bucket): rows in powers of two up to
  MAX_PREFILL_ROWS (and no more than the runner's padding slots), widths in powers of two
  from MIN_PREFILL_WIDTH up to MAX_PREFILL_WIDTH (and max_prefill_tokens), only shapes of
  at most max_prefill_tokens tokens: the scheduler's budget of padded tokens, and the
  scratch rows that padding tokens write to, one each. A plan of r chunks of at most w
  tokens replays the smallest shape holding it, and the scheduler packs no step past the
  shapes (`widest`). Before, a burst of short prompts could pack 20 to a step, past the
  largest shape (8 rows then), and such a step ran eagerly: the likely cause of the H100
  sweep's TTFT p99 at concurrency 64 (2026-12-07: 308 ms with prefill graphs, 182 eager).
- Static inputs, staged through page-locked buffers (graph_runner.HostStaging): token ids
  [R, W], the token after each position [R, W], one int row per chunk (ROW_FIELDS) and the
  rows' sampling parameters. Rows past the real ones point at the runner's padding slots
  with length 0: every position of theirs is invalid, so their K/V go to the scratch rows,
  their cache length stays 0, the drafter observes none of them and their anchors stay.
- Fixed shapes, no host reads: attention reads every block-table column (num_keys=None)
  and the attention hints (each row's chunk end as its key reach, its chunk length as its
  queries, the eager prefill's kind) are updated in place before each replay. Resetting a
  fresh sequence's cache and drafter lengths runs eagerly before the replay, as before an
  eager forward.
- Keys: (rows, width, sampling flags, whether the drafter observes). Start-up captures
  every shape for greedy and for plain-temperature rows (the drafter observing, where
  there is one), with the step graphs: which shape a step needs follows the arrivals, and
  a lazily captured shape would put a capture (warm-up runs + record) into the time to
  first token of whichever request meets it first. Other flags are captured on first use;
  at most MAX_PREFILL_GRAPHS are kept (each holds device memory and, on Ascend, stream
  resources).
- Cost: with the defaults, max_prefill_tokens 2048, max_model_len >= 2048 and 32 or more
  sequences, 33 shapes and 66 graphs at start-up (seconds of capture on a GPU, about what the step graphs take;
  widths stop at max_model_len, so short-context engines capture fewer). They share one graph
  pool of their own, so the memory that stays is roughly one largest shape's activations (the
  [R, W, hidden] states and MLP intermediates, the [R, 1, W, max_model_len] mask) plus every
  graph's small static inputs; the bytes are measured and logged.
- Not the step graphs' pool: a graph captured later into a shared pool may place its outputs
  where an earlier graph keeps intermediates, and a step replays its prefill graph, then its
  verify graph, then copies both graphs' outputs to the host. In one pool the verify replay
  overwrote the first token the prefill had just sampled (the H100, 2026-12-07: garbage or a
  wrong first token for a chunked prompt; its anchor on the device, and so the rest of the
  output, was right).
- On by default wherever the step graphs run (`prefill_graphs=False` turns them off); with
  their own pool, tests/engine/test_prefill_graphs_cuda.py passed on an H100 (2026-12-07).

What stays eager, logged once per reason with the shape that met it: more rows than the
largest rows bucket, a chunk wider than the largest width bucket or rows x width past
max_prefill_tokens, logprobs asked for (the prompt's or the first token's: decode steps
with logprobs run eagerly too), constrained (grammar) rows, a key whose capture failed or
found the cache full. Platforms without graphs (CPU) never build this runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ascend_dspark.spec.sampling import SamplingBatch
from ops.context import AttentionHints, ForwardContext

from .graph_runner import (STARTUP_FLAGS, HostStaging, cached_capture, default_buckets, sampling_flags,
                           static_sampling)
from .scheduler import PrefillChunk

logger = logging.getLogger(__name__)

MAX_PREFILL_ROWS = 32           # a burst of short chat prompts (~100 tokens) prefills 16 per step
MIN_PREFILL_WIDTH = 16
MAX_PREFILL_WIDTH = 2048        # a 2048-token chunk of a small model is still launch-bound
MAX_PREFILL_GRAPHS = 96         # per runner: start-up captures 2 per shape, the rest on first use
# One int row per chunk, the static input `rows` of prefill_core: where the chunk starts and how
# long it is, its sequence slot, whether it samples a fresh prompt's first token, whether it is the
# prompt's last chunk, the anchor of a resumed (preempted) request, whether the drafter observes it.
ROW_FIELDS = ("start", "length", "slot", "samples_first", "is_last", "resumed_anchor", "observed")


def powers_of_two(low: int, top: int) -> list[int]:
    """low, 2 low, 4 low, ... below `top`, then `top` itself (empty when top < low)."""
    if top < low:
        return []
    sizes, n = [], low
    while n < top:
        sizes.append(n)
        n *= 2
    return sizes + [top]


def prefill_inputs(chunks: list[PrefillChunk], observe: list[bool], width: int,
                   pad_slots: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The host tensors of one prefill: token ids [B, width], the token after each position
    (0 where not known yet, and in the padding) [B, width], and one row of ROW_FIELDS per
    chunk [B, 7]; then one padding row per slot in `pad_slots` (length 0: writes nothing)."""
    ids, following, rows = [], [], []
    for chunk, observed in zip(chunks, observe):
        request = chunk.request
        tokens = request.tokens
        ids.append(_padded(tokens[chunk.start:chunk.end], width))
        following.append(_padded(tokens[chunk.start + 1:chunk.end + 1], width))
        samples_first = chunk.is_last and not request.output
        rows.append([chunk.start, chunk.end - chunk.start, request.slot, int(samples_first), int(chunk.is_last),
                     request.output[-1] if request.output else 0, int(observed)])
    for slot in pad_slots:
        ids.append([0] * width)
        following.append([0] * width)
        rows.append([0, 0, slot, 0, 0, 0, 0])
    return torch.tensor(ids), torch.tensor(following), torch.tensor(rows)


def _padded(tokens: list[int], width: int) -> list[int]:
    return tokens + [0] * (width - len(tokens))


def attention_lengths(chunks: list[PrefillChunk], pad: int = 0) -> tuple[list[int], list[int]]:
    """The attention hints' lengths of a prefill: each row's chunk end (the keys it reaches)
    and chunk length (its real queries); a padding row reaches one key with one query."""
    return [c.end for c in chunks] + [1] * pad, [c.end - c.start for c in chunks] + [1] * pad


@dataclass
class _Captured:
    graph: object
    ids: torch.Tensor
    following: torch.Tensor
    rows: torch.Tensor
    sampling: SamplingBatch
    hints: AttentionHints
    outputs: dict[str, torch.Tensor]


class PrefillGraphRunner:
    """The prefill graphs of one model runner (runner.py): it replays `runner.prefill_core`."""

    def __init__(self, runner, pool, max_prefill_tokens: int, max_model_len: int,
                 buckets: tuple[list[int], list[int]] | None = None) -> None:
        """`buckets`: (rows buckets, width buckets), default powers of two (module docstring) no
        wider than a prompt can be (max_model_len); shapes past max_prefill_tokens tokens or with
        more rows than padding slots are dropped."""
        self.runner = runner
        self.platform = runner.platform
        self.pad_slots = runner.pad_slots
        self.pool = pool                              # the prefill graphs' own pool (module docstring)
        if buckets is None:
            buckets = (default_buckets(min(MAX_PREFILL_ROWS, len(self.pad_slots))),
                       powers_of_two(MIN_PREFILL_WIDTH, min(MAX_PREFILL_WIDTH, max_prefill_tokens, max_model_len)))
        rows_buckets, width_buckets = buckets
        self.shapes = sorted((rows, width) for rows in set(rows_buckets) for width in set(width_buckets)
                             if rows * width <= max_prefill_tokens and rows <= len(self.pad_slots))
        self.max_prefill_tokens = max_prefill_tokens
        self.graphs: dict[tuple, _Captured] = {}
        self.failed: dict[tuple, str] = {}            # key -> why it runs eagerly (logged once)
        self._logged_reasons: set[str] = set()
        self.graph_bytes = 0
        self.staging = HostStaging(self.platform)

    def capture_startup(self, progress: bool = True) -> None:
        """Every shape for greedy and for plain-temperature rows, the drafter observing if there is one."""
        watch = self.runner.drafter is not None
        keys = [(shape, params) for shape in self.shapes for params in STARTUP_FLAGS]
        for (rows, width), params in tqdm(keys, desc="capture prefill graphs", disable=not progress, unit="graph"):
            self._graph_for(rows, width, SamplingBatch([params] * rows, self.runner.device, self.platform.ops), watch)
        logger.info("captured %d prefill graphs (rows x width %s): %.1f MiB of graph memory",
                    len(self.graphs), self.shapes, self.graph_bytes / 2**20)

    def widest(self, rows: int) -> int:
        """The widest chunk a captured shape holds beside rows - 1 others (0: none holds `rows`):
        the scheduler's packing limit, so a step never leaves the graphs for one chunk too many."""
        return max((w for r, w in self.shapes if r >= rows), default=0)

    def shape_for(self, rows: int, width: int) -> tuple[int, int] | None:
        """The smallest captured shape holding `rows` chunks of up to `width` tokens."""
        fitting = [s for s in self.shapes if s[0] >= rows and s[1] >= width]
        return min(fitting, key=lambda s: (s[0] * s[1], s[0]), default=None)

    @classmethod
    def build(cls, runner, wanted: bool | None, max_prefill_tokens: int, max_model_len: int,
              buckets: tuple[list[int], list[int]] | None) -> PrefillGraphRunner | None:
        """The runner's prefill graphs where it has step graphs, unless `wanted` is False (None,
        the default: on). They need the step graphs' padding slots, so without those it says
        why, if asked."""
        if runner.graph_runner is None:
            if wanted:
                logger.warning("prefill graphs need the step graphs (graphs on a platform that has them): "
                               "prompt chunks run eagerly")
            return None
        if wanted is False:
            return None
        return cls(runner, runner.platform.graph_pool(), max_prefill_tokens, max_model_len, buckets)

    def run(self, chunks: list[PrefillChunk], observe: list[bool], watch: bool, logprobs: bool = False,
            constrained: bool = False) -> dict[str, torch.Tensor] | None:
        """Replay the prefill of these chunks; None (logged once per reason) when it runs eagerly.
        `watch`: whether the drafter observes any row. `logprobs`: some row asked for logprobs;
        `constrained`: some row has a grammar (both run eagerly: they add host work)."""
        rows, width = len(chunks), max(c.end - c.start for c in chunks)
        shape = self.shape_for(rows, width)
        why_eager = ("logprobs requested" if logprobs else "a constrained (grammar) request" if constrained
                     else self._why_no_shape(rows, width) if shape is None else None)
        if why_eager is not None:
            self._log_eager(why_eager, f"a prefill of {rows} rows x {width} tokens runs eagerly: {why_eager}")
            return None
        bucket_rows, bucket_width = shape
        pad = bucket_rows - rows
        params = [c.request.params for c in chunks]
        # built on the host, uploaded through the staging buffers; padding rows copy row 0's flags
        sampling = SamplingBatch(params + [params[0]] * pad, torch.device("cpu"), self.platform.ops)
        captured = self._graph_for(bucket_rows, bucket_width, sampling, watch)
        if captured is None:
            return None
        ids, following, row_fields = prefill_inputs(chunks, observe, bucket_width, self.pad_slots[:pad])
        self.staging.upload([(captured.ids, ids), (captured.following, following), (captured.rows, row_fields)]
                            + [(getattr(captured.sampling, name), getattr(sampling, name))
                               for name in SamplingBatch.TENSORS])
        captured.hints.update(*attention_lengths(chunks, pad))
        captured.graph.replay()
        return {name: t[:rows] for name, t in captured.outputs.items()}

    def _why_no_shape(self, rows: int, width: int) -> str:
        largest_rows = max((s[0] for s in self.shapes), default=0)
        largest_width = max((s[1] for s in self.shapes), default=0)
        if rows > largest_rows:
            return f"more rows than the largest prefill graph bucket ({largest_rows} rows)"
        if width > largest_width:
            return f"wider than the largest prefill graph bucket ({largest_width} tokens)"
        return f"no prefill graph shape holds it within max_prefill_tokens={self.max_prefill_tokens}"

    def _log_eager(self, reason: str, message: str) -> None:
        if reason not in self._logged_reasons:
            self._logged_reasons.add(reason)
            logger.warning("%s (logged once per reason)", message)

    def _graph_for(self, rows: int, width: int, sampling: SamplingBatch, watch: bool) -> _Captured | None:
        """The graph of this key, captured now if new; None when the key runs eagerly."""
        key = (rows, width, sampling_flags(sampling), watch)
        return cached_capture(self.graphs, self.failed, key, MAX_PREFILL_GRAPHS, lambda: self._capture(key, sampling),
                              self._fail)

    def _fail(self, key: tuple, why: str) -> None:
        self.failed[key] = why
        logger.warning("prefill graph for %d rows x %d tokens, sampling flags %s%s runs eagerly: %s",
                       key[0], key[1], key[2], "" if key[3] else " (no drafter observing)", why)

    def _capture(self, key: tuple, sampling: SamplingBatch) -> _Captured:
        rows, width, _, watch = key
        dev = self.runner.device
        # Captured on padding rows (length 0: the warm-up runs write nothing a request owns).
        ids = torch.zeros(rows, width, dtype=torch.long, device=dev)
        following = torch.zeros_like(ids)
        row_fields = torch.tensor([[0, 0, slot, 0, 0, 0, 0] for slot in self.pad_slots[:rows]]).to(dev)
        static = static_sampling(sampling, dev)
        graph = self.platform.graph(self.pool)
        before = self.platform.memory_stats()["allocated_bytes"]
        hints = AttentionHints([1] * rows, [1] * rows, self.runner.prefill_attention)
        ctx = ForwardContext(self.platform.ops, num_keys=None, hints=hints, graph=graph)
        outputs = graph.capture(lambda: self.runner.prefill_core(ids, following, row_fields, static, ctx, watch))
        self.graph_bytes += max(self.platform.memory_stats()["allocated_bytes"] - before, 0)
        captured = _Captured(graph, ids, following, row_fields, static, hints, outputs)
        self.graphs[key] = captured
        return captured
