"""What the ops of one forward need to know from their caller, handed down explicitly.

A forward's ops need to know which implementation runs them (the platform's op registry),
and attention kernels may want host facts the tensors do not carry: how many key columns to
read, each row's sequence lengths as host integers (Ascend's fused attention
bakes them into a captured graph), and whether the forward is being captured into a
device graph (an op whose host arguments change between replays registers itself with
that graph). The model runner builds one `ForwardContext` per forward and passes it down
through the model to every op; nothing travels through module globals or context
variables, so two engines (or a test next to an engine) never see each other's facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .registry import DEVICE_DEFAULTS, OpRegistry

ATTENTION_KINDS = ("explicit", "causal", "prefix")


class AttentionHints:
    """What the host knows about the attention of one forward, for kernels that take sequence
    lengths as host integers (Ascend's fused attention) instead of reading the mask back.

    Without hints such kernels attend over all S = mask.shape[-1] keys of every row and let
    the mask hide the rest (always right, slower for short rows). Kernels that read the mask
    (CPU, CUDA) ignore hints.

    kv_lengths[b]     keys row b can reach: 1 + the largest key index any of its queries
                      sees, <= S. Keys at or past it are invisible to every query of row b.
    query_lengths[b]  real queries of row b, the rest right padding (default: all T).
    kind              what the forward's masks look like (a promise for EVERY mask in it):
      "explicit"  anything (sliding windows, ...): the mask is passed in full;
      "causal"    right-down causal over these lengths, no sliding window: query
                  t < query_lengths[b] sees keys s <= kv_lengths[b] - query_lengths[b] + t
                  (prefill chunks, verification); padding queries are don't-care;
      "prefix"    every query of row b sees exactly keys 0 .. kv_lengths[b] - 1
                  (DFlash/DSpark block drafting, plain decode).

    A graph captured under hints keeps this object: before each replay, `update()` it in
    place with the next step's lengths, as new inputs are copied into the static input
    tensors; the graph hands the new values to its attention before replaying.
    """

    def __init__(self, kv_lengths: Sequence[int], query_lengths: Sequence[int] | None = None,
                 kind: str = "explicit") -> None:
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention hint kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        self.kind = kind
        self.kv_lengths: list[int] = []
        self.query_lengths: list[int] | None = None
        self._set(kv_lengths, query_lengths)

    @property
    def batch(self) -> int:
        return len(self.kv_lengths)

    def update(self, kv_lengths: Sequence[int], query_lengths: Sequence[int] | None = None) -> None:
        """New lengths for the same rows (a captured graph's batch size never changes)."""
        if len(kv_lengths) != self.batch:
            raise ValueError(f"attention hints: {len(kv_lengths)} rows given, captured with {self.batch}")
        self._set(kv_lengths, query_lengths)

    def _set(self, kv_lengths, query_lengths) -> None:
        kv = [int(n) for n in kv_lengths]
        q = None if query_lengths is None else [int(n) for n in query_lengths]
        if not kv or min(kv) < 1:
            raise ValueError(f"attention hints: kv_lengths must be >= 1 for every row, got {kv}")
        if q is not None and (len(q) != len(kv) or min(q) < 1 or any(a > b for a, b in zip(q, kv))):
            raise ValueError(f"attention hints: query_lengths {q} must be 1..kv_length per row ({kv})")
        self.kv_lengths, self.query_lengths = kv, q

    def __repr__(self) -> str:
        return f"AttentionHints(kv_lengths={self.kv_lengths}, query_lengths={self.query_lengths}, kind={self.kind!r})"


class CapturingGraph(Protocol):
    """The device graph a forward is being captured into, as ops see it: a kernel whose host
    arguments change between replays is issued through `capture_task(launch, prepare)`, and
    the graph re-issues `launch(*prepare())` with the current values before every replay
    (`prepare` computes the host values; the default passes none)."""

    def capture_task(self, launch: Callable[..., object], prepare: Callable[[], tuple] = tuple) -> None: ...


@dataclass
class ForwardContext:
    """The host-side facts of one forward.

    ops        the op registry of the platform running it (`ctx.ops.rms_norm(...)`);
               DEVICE_DEFAULTS (each device type's own backend) when no platform says.
    num_keys   key positions attention spans per row (rounded up to whole blocks by the
               cache); None: the block table's full width, as a captured graph needs, since
               its shapes cannot follow the rows' lengths.
    hints      the rows' attention lengths (AttentionHints), or None.
    graph      the graph this forward is being captured into, or None when it runs eagerly.
    """

    ops: OpRegistry = DEVICE_DEFAULTS
    num_keys: int | None = None
    hints: AttentionHints | None = None
    graph: CapturingGraph | None = None
    _derived: dict[Callable, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def derived(self, source: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`compute(source)`, reused while the same source comes back: the layers of one forward
        share their mask, so a kernel's per-mask preparation (the Triton attention's per-query
        reach) runs once per mask, not once per layer. One entry per `compute`, so a context
        replayed eagerly many times holds one result, not one per replay."""
        hit = self._derived.get(compute)
        if hit is None or hit[0] is not source:
            hit = self._derived[compute] = (source, compute(source))
        return hit[1]
