"""Whole verify steps captured as device graphs (CUDA graphs, NPU graphs) and replayed.

Eager decoding is launch-bound: a step of a small model is hundreds of tiny kernels, and
the host cannot issue them as fast as the device runs them. Here the whole step (draft
proposal with its sampling, the target's verify forward, verification, rollback, the
drafter's observe) is captured once per batch-size bucket and replayed with one launch.

- Static inputs: the rows' sequence slots, their verify lengths and sampling tensors are
  copied into fixed buffers before a replay, through page-locked host buffers without
  blocking the host (`HostStaging`), so a batch change does not stall the overlap; rows past the real batch point at the
  runner's padding slots (one per row, each with its own blocks, lengths reset by the
  step), so a padded row never touches a request's cache and no two rows write one
  cache row (Ascend's scatter leaves duplicates undefined).
- Shapes are fixed per bucket: attention reads every block-table column (a forward context
  with `num_keys=None`), so nothing in the step depends on a value read back from the device.
  The context also carries the graph being captured (Ascend's attention registers its
  updatable task with it) and the attention hints, updated in place before every replay.
- Sampling's host flags (all greedy, which filters run) choose code paths and the draft
  depth (the batch's largest per-request cap, K by default) sets shapes, so each graph is
  keyed by (bucket, draft depth, flags, whether the drafter observes, steps); the common
  keys (K drafts, all greedy or plain temperature) are captured at start-up with a
  progress bar, others on first use.
- Steps: a key with steps N > 1 is N plain decode steps (no drafts, the drafter asleep)
  captured one after the other into one graph (`ModelRunner.decode_core`), so the host
  pays one launch, one staging and one host copy for N tokens per row (engine/multistep.py
  says when the engine asks for it). Each step reads the anchors and cache lengths the one
  before it wrote on the device; one set of attention hints, reaching the last step's
  keys, serves all N (hints are bounds: keys past them are invisible, nearer ones are not
  promised to exist). Speculative steps stay one per launch: each step's depth is planned
  from the confidences the step before it returned.
- The runner's graphs share one memory pool of their own (an engine's graphs die with it);
  the bytes it takes are measured.
- Bounded: the key holds only what changes the kernel sequence (top-k bounds as the class
  a kernel's range check sees, never the raw values), and at most `MAX_GRAPHS` are kept:
  each graph holds device memory and, on Ascend, stream resources (ACL error 207008 is
  where an unbounded cache ends).
A batch above the largest bucket, a key past the cap, or a key whose capture failed runs
eagerly: a failed capture (an op the device cannot record, say) never stops the engine; it
is logged once with the bucket and the error, and that key is not tried again.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams
from ops.context import AttentionHints, ForwardContext
from ops.sampling import top_k_bounds_class

logger = logging.getLogger(__name__)

STARTUP_FLAGS = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0))


MAX_DEFAULT_BUCKET = 256        # larger decode batches are compute-bound: eager launches cost little there
MAX_GRAPHS = 128                # per runner: start-up captures 2 per bucket (+ the depth menu, + 2 multi-step),
                                # the rest on first use


def default_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to the batch limit (itself included), at most MAX_DEFAULT_BUCKET."""
    top = min(max_batch_size, MAX_DEFAULT_BUCKET)
    buckets, b = [], 1
    while b < top:
        buckets.append(b)
        b *= 2
    return buckets + [top]


def use_graphs(platform, device: torch.device, wanted: bool | None) -> bool:
    """Whether a runner with its model on `device` replays graphs: where the platform has them
    (default); asking for them elsewhere warns. A model on another device than the platform's
    (a CPU model on a GPU machine) runs eagerly."""
    if device.type != platform.device.type:
        if wanted:
            logger.warning("graph replay needs the model on %s, it is on %s: steps run eagerly", platform.device, device)
        return False
    if wanted is None:
        if platform.supports_graphs and not platform.graph_steps:
            logger.info("%s: whole-step graph replay is not enabled on this platform yet; steps run eagerly",
                        platform.name)
        return platform.graph_steps
    if wanted and not platform.supports_graphs:
        why = platform.graphs_disabled_reason
        logger.warning("graph replay is not available on %s%s: steps run eagerly", platform.name,
                       f" ({why})" if why else "")
        return False
    return wanted


def sampling_flags(sampling: SamplingBatch) -> tuple:
    """What of a batch's sampling parameters changes a captured graph's kernel sequence (a graph key part)."""
    return (sampling.all_greedy, sampling.any_greedy, sampling.use_top_k, sampling.use_top_p,
            sampling.use_min_p, top_k_bounds_class(sampling.top_k_bounds))


def static_sampling(sampling: SamplingBatch, device: torch.device) -> SamplingBatch:
    """A graph's own copy of a sampling batch: its host flags, and device tensors of its own
    that replays read (new rows' parameters are copied into them, never rebound)."""
    static = SamplingBatch.__new__(SamplingBatch)
    static.__dict__.update(sampling.__dict__)
    static.device = device
    for name in SamplingBatch.TENSORS:
        setattr(static, name, getattr(sampling, name).to(device, copy=True))
    return static


def cached_capture(graphs: dict, eager: dict, key: tuple, limit: int, capture, run_eagerly):
    """`graphs[key]`, captured now (`capture()`) if new; None when the key runs eagerly: it
    failed before (`eager` holds why), the cache already holds `limit` graphs, or its capture
    raises (an op the device cannot record, say). `run_eagerly(key, why)` records and logs a
    new reason. Shared by the step graphs and the prefill graphs."""
    if key in graphs:
        return graphs[key]
    if key not in eager and len(graphs) >= limit:
        run_eagerly(key, f"the graph cache is full ({limit} graphs)")
    if key in eager:
        return None
    try:
        return capture()
    except Exception as exc:  # noqa: BLE001 - whatever the device refused, the work still runs eagerly
        run_eagerly(key, f"capture failed: {type(exc).__name__}: {exc}")
        return None


class HostStaging:
    """Page-locked host buffers for the graphs' static inputs. A pageable host -> device copy
    blocks the host until the device queue reaches it, which undoes the overlap of host and
    device work whenever the batch changes; from pinned memory the copy is queued and the host
    goes on. A buffer is refilled only after the copies out of it ran (one event)."""

    def __init__(self, platform) -> None:
        self.platform = platform
        self.buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.event = None

    def upload(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each host tensor `src` into its device tensor `dst` (same shape) asynchronously."""
        if self.event is not None:
            self.event.synchronize()
        for i, (dst, src) in enumerate(pairs):
            buf = self.buffers.get((i, src.dtype))
            if buf is None or buf.numel() < src.numel():
                buf = self.buffers[(i, src.dtype)] = self.platform.pinned_empty(src.numel(), src.dtype)
            staged = buf[:src.numel()].view(src.shape)
            staged.copy_(src)
            dst.copy_(staged, non_blocking=True)
        self.event = self.platform.event()
        self.event.record()


class _Captured:
    def __init__(self, graph, slots, verify_lens, sampling, hints, outputs) -> None:
        self.graph, self.slots, self.verify_lens, self.sampling = graph, slots, verify_lens, sampling
        self.hints, self.outputs = hints, outputs


class StepGraphRunner:
    """The step graphs of one model runner (runner.py): it replays `runner.verify_core`."""

    def __init__(self, runner, buckets: list[int]) -> None:
        self.runner = runner
        self.platform = runner.platform
        self.buckets = sorted(buckets)
        self.pad_slots = runner.pad_slots
        self.graphs: dict[tuple, _Captured] = {}
        self.eager: dict[tuple, str] = {}              # key -> why it runs eagerly (logged once)
        self.pool = self.platform.graph_pool()        # this runner's graphs only: engines come and go
        self.graph_bytes = 0
        self._warned_eager = False
        # Per step count: the graph replayed last and the inputs its static buffers hold, so a
        # batch alternating between single and multi-step launches re-uploads nothing.
        self._last: dict[int, tuple[tuple, _Captured]] = {}
        self.staging = HostStaging(self.platform)

    def capture_startup(self, progress: bool = True, depths: list[int] = (), steps: int = 1) -> None:
        """Per bucket: K drafts for both start-up flag sets, and every other depth in `depths`
        (the confidence policy's menu) for greedy rows; with `steps` > 1 and plain decoding
        to expect (no drafter, or the confidence policy, whose drafter may fall asleep), the
        multi-step plain graph for both flag sets (with a drafter under the fixed policy only
        requests capped at 0 drafts decode plainly: their graphs are captured on first use)."""
        k = self.runner.num_speculative_tokens
        keys = [(b, p, k) for b in self.buckets for p in STARTUP_FLAGS]
        keys += [(b, STARTUP_FLAGS[0], d) for b in self.buckets for d in depths if d != k]
        keys = [(*key, True, 1) for key in keys] + [(b, STARTUP_FLAGS[0], 0, False, 1) for b in self.buckets if depths]
        if steps > 1 and (depths or k == 0):
            keys += [(b, p, 0, False, steps) for b in self.buckets for p in STARTUP_FLAGS]
        for bucket, params, depth, observe, n in tqdm(keys, desc="capture graphs", disable=not progress, unit="graph"):
            self._graph_for(bucket, depth, SamplingBatch([params] * bucket, self.runner.device, self.platform.ops),
                            observe, n)
        logger.info("captured %d step graphs (buckets %s): %.1f MiB of graph memory",
                    len(self.graphs), self.buckets, self.graph_bytes / 2**20)

    def bucket_for(self, batch: int) -> int | None:
        bucket = next((b for b in self.buckets if b >= batch), None)
        if bucket is None and not self._warned_eager:
            self._warned_eager = True
            logger.warning("a decode batch of %d is above the largest graph bucket %d: it runs eagerly",
                           batch, self.buckets[-1])
        return bucket

    def run(self, slots: list[int], verify_lens: list[int], num_drafts: int, params: list[SamplingParams],
            identity: tuple, reach: list[int], observe: bool = True, steps: int = 1) -> dict | None:
        """Replay the step for these rows; None when the batch needs the eager path.
        `identity` names the rows' requests uniquely (never reused): while it and the verify
        lengths stay the same, the static inputs already hold this batch. `reach[b]`: the
        keys row b can see this step (the attention hints of kernels taking host lengths).
        `steps` > 1: that many plain decode steps in one replay (num_drafts 0, observe False)."""
        bucket = self.bucket_for(len(slots))
        if bucket is None:
            return None
        pad = bucket - len(slots)
        inputs = (identity, tuple(slots), tuple(verify_lens), observe)
        last = self._last.get(steps)
        captured = last[1] if last is not None and last[0] == inputs else None
        if captured is None:        # the batch changed: refresh the static inputs (else they hold)
            # built on the host, uploaded through the staging buffers; padding rows copy row 0's flags
            sampling = SamplingBatch(params + [params[0]] * pad, torch.device("cpu"), self.platform.ops)
            captured = self._graph_for(bucket, num_drafts, sampling, observe, steps)
            if captured is None:
                return None
            self.staging.upload([(captured.slots, torch.tensor(slots + self.pad_slots[:pad])),
                                 (captured.verify_lens, torch.tensor(verify_lens + [0] * pad))]
                                + [(getattr(captured.sampling, name), getattr(sampling, name))
                                   for name in SamplingBatch.TENSORS])
            self._last[steps] = (inputs, captured)
        captured.hints.update(reach + [self.runner.reserve] * pad)
        captured.graph.replay()
        n = len(slots)
        return {name: t[:n] for name, t in captured.outputs.items()}

    def _graph_for(self, bucket: int, num_drafts: int, sampling: SamplingBatch,
                   observe: bool = True, steps: int = 1) -> _Captured | None:
        """The graph of this key, captured now if new; None when the key runs eagerly."""
        key = (bucket, num_drafts, sampling_flags(sampling), observe, steps)
        return cached_capture(self.graphs, self.eager, key, MAX_GRAPHS, lambda: self._capture(key, sampling),
                              self._run_eagerly)

    def _run_eagerly(self, key: tuple, why: str) -> None:
        self.eager[key] = why
        logger.warning("step graph for bucket %d, %d drafts, sampling flags %s%s%s runs eagerly: %s",
                       key[0], key[1], key[2], "" if key[3] else " (drafter asleep)",
                       f", {key[4]} steps per launch" if key[4] > 1 else "", why)

    def _capture(self, key: tuple, sampling: SamplingBatch) -> _Captured:
        bucket, num_drafts, _, observe, steps = key
        dev = self.runner.device
        slots = torch.tensor(self.pad_slots[:bucket]).to(dev)
        verify_lens = torch.zeros(bucket, dtype=torch.long, device=dev)
        static = static_sampling(sampling, dev)
        graph = self.platform.graph(self.pool)
        before = self.platform.memory_stats()["allocated_bytes"]
        # Hints with the padding slot's reach; updated to the real rows' before every replay.
        hints = AttentionHints([self.runner.reserve] * bucket, kind="explicit")
        ctx = ForwardContext(self.platform.ops, num_keys=None, hints=hints, graph=graph)
        if steps > 1:
            outputs = graph.capture(lambda: self.runner.decode_core(slots, steps, static, ctx))
        else:
            outputs = graph.capture(lambda: self.runner.verify_core(slots, verify_lens, num_drafts, static, None, ctx,
                                                                    observe))
        self.graph_bytes += max(self.platform.memory_stats()["allocated_bytes"] - before, 0)
        captured = _Captured(graph, slots, verify_lens, static, hints, outputs)
        self.graphs[key] = captured
        return captured
