"""The attention hints of a prefill: what the engine promises kernels that take host lengths.

Ascend's fused attention reads sequence lengths from the host instead of the mask
(ops/context.py, the forward context's AttentionHints); CPU and CUDA kernels ignore them, so a wrong hint
passes every CPU test and only corrupts attention on an NPU. A prefill forward (the
target's, and the drafter's observe in the same step) runs its chunks causally: row b's
queries are its chunk c.start..c.end - 1, its keys 0..c.end - 1, so the hint is
kv_lengths [c.end], query_lengths [c.end - c.start], kind "causal"; a target with sliding
windows (Gemma3) promises only "explicit" (the mask is passed in full). Expected hints are
worked out here from the chunk plan (budget 8 tokens: prompts 3 + 4 in one padded forward,
then 11 tokens as 8 + 3), and recorded from the context each target forward and drafter
observe is handed.
"""

from __future__ import annotations

import pytest
from engine_doubles import _Wrapper, make_target, one_thread, real_drafter  # noqa: F401
from torch import nn

from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams
from ops.registry import DEVICE_DEFAULTS

PROMPTS = [[5, 17, 3], [9, 1, 44, 2], list(range(20, 31))]


def seen(ctx) -> tuple | None:
    h = None if ctx is None else ctx.hints
    return None if h is None else (h.kind, list(h.kv_lengths), h.query_lengths and list(h.query_lengths))


class HintSpyTarget(nn.Module):
    """TEST DOUBLE around the real target: records the hints each forward runs under."""

    def __init__(self, target) -> None:
        super().__init__()
        self.inner, self.config, self.hints, self.starts, self.widths = target, target.config, [], [], []

    def logits(self, hidden, registry=DEVICE_DEFAULTS):
        return self.inner.logits(hidden, registry)

    def rotary(self, *args):
        return self.inner.rotary(*args)

    def forward(self, input_ids, positions, cache, slot_ids, valid, capture_layers=(), ctx=None):
        self.hints.append(seen(ctx))
        self.starts.append(positions[:, 0].tolist())
        self.widths.append(ctx.num_keys)
        return self.inner(input_ids, positions, cache, slot_ids, valid, capture_layers, ctx)


class HintSpyDrafter(_Wrapper):
    """TEST DOUBLE around a real drafter: records the hints each observe runs under."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.hints = []

    def observe(self, slot_ids, features, positions, next_tokens, counts, ctx=None):
        self.hints.append(seen(ctx))
        super().observe(slot_ids, features, positions, next_tokens, counts, ctx)


@pytest.mark.parametrize("arch, kind", [("qwen3", "causal"), ("gemma3", "explicit")])
def test_prefill_chunks_promise_causal_attention_over_their_own_lengths(arch, kind):
    target = make_target(arch)
    spy = HintSpyTarget(target)
    drafter = HintSpyDrafter(real_drafter("eagle3", target))
    engine = Engine(spy, drafter, num_speculative_tokens=3, max_model_len=64, max_batch_size=3,
                    max_prefill_tokens=8)
    engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    want = [(kind, [3, 4], [3, 4]), (kind, [8], [8]), (kind, [11], [3])]
    # Verify steps give no query lengths (their rows are K + 1 wide); a prefill must give them.
    assert [h for h in spy.hints if h is None or h[2] is not None] == want
    assert [h for h in drafter.hints if h is None or h[2] is not None] == want


def test_verify_steps_promise_each_rows_reach_and_no_more():
    """Without overlap the host knows every row's committed length: a verify step's rows reach
    their anchor position plus what one step writes (`reserve`), exactly, and attention reads
    the key columns of the furthest row (a prefill: of its furthest chunk end), no more."""
    target = make_target()
    spy = HintSpyTarget(target)
    engine = Engine(spy, real_drafter("dspark", target), num_speculative_tokens=3, max_model_len=64,
                    max_batch_size=3, overlap=False)
    engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True))
    steps = list(zip(spy.hints, spy.starts, spy.widths))
    assert any(h[2] is None for h, _, _ in steps)
    for (kind, kv_lengths, query_lengths), starts, width in steps:
        if query_lengths is None:                 # a verify step
            assert kind == "explicit" and kv_lengths == [a + engine.runner.reserve for a in starts]
        assert width == max(kv_lengths)

