"""ASCEND_DSPARK_OPS: the whole registry, or only the ops named, forced to the reference."""

from __future__ import annotations

import pytest
import torch

from ops import registry


@pytest.mark.parametrize("setting,forced", [
    (None, set()), ("", set()), ("triton", set()), ("reference", {"linear", "attention", "rms_norm"}),
    ("REFERENCE", {"linear", "attention", "rms_norm"}), ("reference:linear", {"linear"}),
    ("reference: linear , attention", {"linear", "attention"}),
])
def test_which_ops_a_setting_forces(setting, forced):
    for op in ("linear", "attention", "rms_norm"):
        assert registry.forces_reference(setting, op) == (op in forced), (setting, op)


def test_a_forced_op_resolves_to_its_reference_and_the_setting_is_read_per_call(monkeypatch):
    calls = []
    monkeypatch.setitem(registry.IMPLS, "probe_op", {registry.REFERENCE: lambda x: "reference",
                                                      "fast": lambda x: calls.append(x) or "fast"})
    monkeypatch.setitem(registry.BACKEND_MODULES, "fast", "ops")          # any importable module
    reg = registry.OpRegistry("cpu", "fast")
    x = torch.zeros(1)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert reg.resolve("probe_op", x.device)(x) == "fast"
    monkeypatch.setenv(registry.ENV_VAR, "reference:probe_op")
    assert reg.resolve("probe_op", x.device)(x) == "reference"
    monkeypatch.setenv(registry.ENV_VAR, "reference:linear")
    assert reg.resolve("probe_op", x.device)(x) == "fast"
