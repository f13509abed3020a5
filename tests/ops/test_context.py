"""The forward context (ops/context.py): attention hints validate what a kernel would
otherwise trust blindly, and a context's derived values follow their source tensor."""

from __future__ import annotations

import pytest
import torch

from ops.context import AttentionHints, ForwardContext


def test_attention_hints_validate_and_update_in_place():
    h = AttentionHints([5, 9], [2, 3], kind="causal")
    h.update([6, 10], [1, 1])
    assert h.kv_lengths == [6, 10] and h.query_lengths == [1, 1] and h.kind == "causal"
    with pytest.raises(ValueError, match="captured with 2"):
        h.update([6])
    with pytest.raises(ValueError, match="1..kv_length"):
        AttentionHints([3, 4], [4, 1])
    with pytest.raises(ValueError, match=">= 1"):
        AttentionHints([0])
    with pytest.raises(ValueError, match="kind"):
        AttentionHints([3], kind="sliding")


def test_derived_values_are_computed_once_per_source_and_follow_a_new_source():
    calls = []

    def total(t):
        calls.append(t)
        return t.sum()

    ctx = ForwardContext()
    first, second = torch.ones(3), torch.ones(4)
    assert ctx.derived(first, total) == 3 and ctx.derived(first, total) == 3
    assert len(calls) == 1                                   # the layers of a forward share it
    assert ctx.derived(second, total) == 4 and len(calls) == 2
    assert ctx.derived(first, total) == 3 and len(calls) == 3        # one entry: recomputed, not stale
    assert ForwardContext().derived(first, total) == 3 and len(calls) == 4   # nothing shared between contexts
