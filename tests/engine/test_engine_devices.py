"""The engine keeps every tensor it computes with on the model's device.

The CPU suite has one device, so a dropped `device=` argument in the step loop
(`torch.arange(k + 1)` for `torch.arange(k + 1, device=anchors.device)`) only shows on an NPU
or a GPU, where the CPU-made tensor meets the model's and the op raises.

Why not simply a meta default device (as the drafter tests do, `with torch.device("meta")`):
the engine legitimately builds host tensors without a device (staging buffers filled from
Python lists, then `.to(device)`; the host-side unpacking of a step's results), and a meta
tensor holds no data to copy. So `HostTensors` below models a second device instead: while
it is active, every tensor a factory (arange, empty, full, tensor, ...) makes without a
device is a `HostMade` tensor, which may be read, indexed, written into a device tensor and
moved with `.to(device)`, but raises when an op combines it with a tensor of the model (0-dim
tensors excepted, as CPU scalars are on an accelerator) or indexes one (legal in torch, but
a hidden host-to-device copy of the index on every such op).

Each batch has a sampled row (verification reads the draft distributions only for sampled
rows) and a greedy row. Oracles: the greedy row equals plain greedy decoding
(tests.helpers.greedy_decode, no engine), the sampled row equals the same seeded request run
outside the context. tests/mutants/survivors.md lists the mutants these tests kill.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import greedy_decode, tiny_target

PROMPTS = [[5, 6, 7, 8], [9, 10]]
MAX_TOKENS = 10

FACTORIES = {torch.arange, torch.empty, torch.zeros, torch.ones, torch.full, torch.tensor, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.empty_strided}
CROSS_DEVICE = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_}   # allowed across devices


class HostMade(torch.Tensor):
    """TEST DOUBLE: a tensor made without a device under `HostTensors` (on an accelerator: host memory)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            host = any(isinstance(t, HostMade) and t.dim() > 0 for t in tensors)
            on_device = any(not isinstance(t, HostMade) and t.dim() > 0 for t in tensors)
            if host and on_device and func not in CROSS_DEVICE:
                raise RuntimeError(f"{getattr(func, '__name__', func)}: a tensor made without a device meets a "
                                   "tensor on the model's device")
            if func in CROSS_DEVICE and func is not torch.Tensor.copy_ and _indexes_the_device_with_host(args):
                raise RuntimeError("a tensor made without a device indexes a tensor on the model's device")
            out = func(*args, **kwargs)
            if on_device:
                return out
            # .to(device) on the CPU returns the same object: a fresh plain view stands for the copy.
            moved = func is torch.Tensor.to and _names_a_device(args[1:], kwargs)
            return pytree.tree_map_only(torch.Tensor, lambda t: t.as_subclass(torch.Tensor if moved else HostMade), out)


def _indexes_the_device_with_host(args) -> bool:
    """`device_tensor[host_index]` (read or write): an implicit copy of the index per op."""
    target, index = args[0], args[1]
    return (not isinstance(target, HostMade) and target.dim() > 0
            and any(isinstance(t, HostMade) and t.dim() > 0 for t in pytree.tree_leaves(index)
                    if isinstance(t, torch.Tensor)))


def _names_a_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)


class HostTensors(TorchFunctionMode):
    """Factories called without a device make `HostMade` tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None:
            return out.as_subclass(HostMade)
        return out


@pytest.fixture(scope="module")
def target():
    before = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny models: one thread is fastest on a shared box
    model, _ = tiny_target("llama", dtype=torch.float64)
    yield model
    torch.set_num_threads(before)


def test_host_made_tensors_raise_when_they_meet_the_model():
    """The double itself: mixing raises, reading and moving do not."""
    model_side = torch.zeros(3, dtype=torch.long)
    with HostTensors():
        host = torch.arange(3)
        assert isinstance(host, HostMade) and not isinstance(torch.arange(3, device="cpu"), HostMade)
        with pytest.raises(RuntimeError, match="without a device"):
            model_side + host
        assert torch.equal(model_side + host.to(model_side.device), torch.arange(3, device="cpu"))
        model_side[host[:1].to(model_side.device)] = host[2:]
        assert host.tolist() == [0, 1, 2] and model_side.tolist() == [2, 0, 0]
        with pytest.raises(RuntimeError, match="indexes"):
            model_side[host[:1]] = 0                      # a host index: a hidden copy per op


@pytest.mark.parametrize("kind", [None, "eagle3", "dflash", "dspark"])
def test_generate_computes_with_no_tensor_made_without_a_device(kind, target):
    drafter = create_drafter(kind, target, seed=1) if kind else None
    engine = Engine(target, drafter, None, num_speculative_tokens=3, max_model_len=48, max_batch_size=2)
    params = [SamplingParams(temperature=0.9, seed=4, max_tokens=MAX_TOKENS, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)]
    with HostTensors():
        got = engine.generate(PROMPTS, params)
    sampled_alone = engine.generate(PROMPTS[:1], params[:1])[0]
    assert got[0].token_ids == sampled_alone.token_ids and len(got[0].token_ids) == MAX_TOKENS
    assert got[1].token_ids == greedy_decode(target, PROMPTS[1], MAX_TOKENS)
