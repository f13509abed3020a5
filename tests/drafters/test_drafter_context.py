"""The forward context a drafter is handed reaches every op it runs: the runner's op registry
(and with it the key width, attention hints and capture graph) must not be dropped on the
way down, in observe, in the shared propose prologue, or in a kind's sequential head."""

from __future__ import annotations

import pytest
import torch
from drafter_helpers import greedy, random_features, scramble

from ascend_dspark.drafters import create_drafter
from ops import registry
from ops.context import ForwardContext
from tests.helpers import RecordingRegistry


# What each kind must run through the context: attention and K/V writes in its layers, norms,
# rotary; DSpark's sequential head too (its greedy step: the proposal below is greedy).
LAYER_OPS = {"attention", "kv_write", "rms_norm", "apply_rotary", "silu_and_mul"}
WANTED = {"eagle3": LAYER_OPS, "dflash": LAYER_OPS, "dspark": LAYER_OPS | {"markov_greedy_step"}}


def no_op_outside_the_context(op, device):
    raise AssertionError(f"{op} resolved through the device defaults, not the forward context's registry")


@pytest.mark.parametrize("kind", ["eagle3", "dflash", "dspark"])
def test_observe_and_propose_run_every_op_through_the_context(target, kind, monkeypatch):
    drafter = scramble(create_drafter(kind, target), 0)
    drafter.allocate(2, 40)
    slots, length = torch.tensor([1]), 6
    feats = random_features(drafter, 1, length)
    positions = torch.arange(length).unsqueeze(0)
    tokens = torch.randint(0, target.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(3))

    monkeypatch.setattr(registry.DEVICE_DEFAULTS, "resolve", no_op_outside_the_context)
    observe_ops = RecordingRegistry()
    drafter.observe(slots, feats, positions, tokens, torch.tensor([length]), ForwardContext(observe_ops))
    propose_ops = RecordingRegistry()
    drafter.propose(slots, tokens[:, -1], torch.tensor([length]), 3, greedy(1), ForwardContext(propose_ops))

    assert {"kv_write", "rms_norm", "apply_rotary"} <= observe_ops.seen, observe_ops.seen
    assert WANTED[kind] <= propose_ops.seen, WANTED[kind] - propose_ops.seen
