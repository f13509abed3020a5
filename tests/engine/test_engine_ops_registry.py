"""Every op an engine runs goes through its platform's op registry (Platform.ops, handed down
in the forward context and the sampling batch), never through the device defaults: on an
Ascend SoC without the fused kernels the platform's registry is what keeps torch_npu out."""

from __future__ import annotations

import pytest
from engine_doubles import make_target, one_thread, real_drafter  # noqa: F401

from ascend_dspark.engine.engine import Engine
from ascend_dspark.platform.cpu import CpuPlatform
from ascend_dspark.spec.sampling import SamplingParams
from ops import registry
from tests.helpers import RecordingRegistry


def no_op_outside_the_platform(op, device):
    raise AssertionError(f"{op} resolved through the device defaults, not the platform's registry")


@pytest.mark.parametrize("kind", [None, "eagle3", "dflash", "dspark"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_op_runs_through_the_platforms_registry(kind, temperature, monkeypatch):
    target = make_target()
    drafter = real_drafter(kind, target) if kind else None
    platform = CpuPlatform()
    platform.ops = RecordingRegistry()
    engine = Engine(target, drafter, num_speculative_tokens=3, max_model_len=64, max_batch_size=2, platform=platform)
    monkeypatch.setattr(registry.DEVICE_DEFAULTS, "resolve", no_op_outside_the_platform)
    params = SamplingParams(temperature=temperature, top_p=0.9, seed=1, max_tokens=6, ignore_eos=True)
    outputs = engine.generate([[5, 17, 3], [9, 1, 44, 2]], params)
    assert all(len(o.token_ids) == 6 for o in outputs)
    wanted = {"attention", "kv_write", "rms_norm", "add_rms_norm", "apply_rotary", "silu_and_mul", "linear"}
    wanted |= {"verify_chain_greedy"} if temperature == 0 else {"top_k_top_p", "exponential_race", "verify_chain"}
    if kind == "dspark":
        wanted.add("markov_greedy_step" if temperature == 0 else "markov_head_step")
    assert wanted <= platform.ops.seen, wanted - platform.ops.seen


@pytest.mark.parametrize("dtype,invariant,warned", [("bfloat16", False, True), ("float16", False, True),
                                                     ("float32", False, False), ("bfloat16", True, False)])
def test_speculation_warns_where_half_precision_is_not_exact(dtype, invariant, warned, caplog, monkeypatch):
    """A platform whose matmul is not batch-invariant says, once, that half-precision
    speculation may differ from plain decoding at near-ties; a batch-invariant one does not."""
    import torch

    from ascend_dspark.engine import runner

    runner._warn_not_exact.cache_clear()
    target = make_target().to(getattr(torch, dtype))
    platform = CpuPlatform()

    def linear(x, w, b=None):
        return torch.nn.functional.linear(x, w, b)

    if invariant:
        linear.batch_invariant = True
    monkeypatch.setattr(platform.ops, "resolve", lambda op, device: linear)
    with caplog.at_level("WARNING", logger=runner.logger.name):
        for _ in range(2):
            Engine(target, real_drafter("dspark", target), num_speculative_tokens=3, max_model_len=64,
                   max_batch_size=2, platform=platform, speculation="fixed")
        Engine(target, None, max_model_len=64, max_batch_size=2, platform=platform)
    messages = [r.getMessage() for r in caplog.records if "not batch-invariant" in r.getMessage()]
    assert len(messages) == (1 if warned else 0)
