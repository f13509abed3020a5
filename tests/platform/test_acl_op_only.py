"""The capture deny-list: aten ops a torch_npu release runs only as aclop operators.

torch_npu refuses aclop operators during NPU graph capture; which ops those are comes from
op-plugin's op_plugin_functions.yaml at the commit each release pins
(tools/npu_contract/acl_op_only.py, committed in torch_npu_contracts/acl_op_only/). Checked:
(a) the generator on a hand-written yaml; (b) the committed lists (one per supported
release, int64 shifts acl_op-only before the 26.0.0 builds); (c) the double refuses a
deny-listed op inside a capture and allows its aclnn rewrite; (d) the project's noise hash
captures on the double.
"""

from __future__ import annotations

import json

import pytest
import torch

import ops
from tests.fakes import fake_torch_npu
from tools import npu_contract
from tools.npu_contract.acl_op_only import NEAREST, SOURCES, acl_op_only, expand, list_path, load_ops

_YAML = """
all_version: [v2.5, v2.6, v2.7, v2.8]
official:
  - func: __rshift__.Scalar(Tensor self, Scalar other) -> Tensor
    acl_op: all_version
  - func: both(Tensor self) -> Tensor
    acl_op: all_version
    op_api: all_version
  - func: late_aclnn.out(Tensor self, *, Tensor(a!) out) -> Tensor(a!)
    acl_op: [v2.5, newest]
    op_api: [v2.7, newest]
  - func: dropped(Tensor self) -> Tensor
    acl_op: [v2.5, v2.6]
  - func: listed(Tensor self) -> Tensor
    acl_op: v2.5, v2.7
  - func: aclnn_only(Tensor self) -> Tensor
    op_api: all_version
  - func: symint_aclnn(SymInt[] size) -> Tensor
    acl_op: all_version
custom:
  - func: npu_thing(Tensor self) -> Tensor
    acl_op: all_version
symint:
  - func: symint_aclnn(SymInt[] size) -> Tensor
    op_api: all_version
  - func: npu_thing(Tensor self) -> Tensor
    acl_op: all_version
quant:
  - func: int_repr(Tensor self) -> Tensor
    acl_op: [v2.6, newest]
"""
_SHIFTS = {f"{op}.{overload}" for op in ("__lshift__", "__rshift__", "__ilshift__", "__irshift__")
           for overload in ("Scalar", "Tensor")}
_LISTS = fake_torch_npu.ACL_OP_ONLY_DIR


# -- (a) the generator ---------------------------------------------------------------------
def test_version_specs_read_like_torchnpugen():
    lines = ["v2.5", "v2.6", "v2.7", "v2.8"]
    assert expand("all_version", lines) == lines
    assert expand(["v2.6", "newest"], lines) == ["v2.6", "v2.7", "v2.8"]
    assert expand(["v2.5", "v2.6"], lines) == ["v2.5", "v2.6"]
    assert expand("v2.5, v2.7", lines) == ["v2.5", "v2.7"]
    assert expand(None, lines) == []


def test_generator_keeps_aten_ops_with_acl_op_and_no_op_api():
    assert acl_op_only(_YAML, "v2.5") == ["__rshift__.Scalar", "dropped", "late_aclnn.out", "listed"]
    assert acl_op_only(_YAML, "v2.6") == ["__rshift__.Scalar", "dropped", "int_repr", "late_aclnn.out"]
    assert acl_op_only(_YAML, "v2.7") == ["__rshift__.Scalar", "int_repr", "listed"]
    assert acl_op_only(_YAML, "v2.8") == ["__rshift__.Scalar", "int_repr"]


# -- (b) the committed lists ---------------------------------------------------------------
def _committed(release: str) -> dict:
    return json.loads(list_path(_LISTS, release).read_text())


def test_every_supported_release_has_a_list_with_its_source():
    assert set(SOURCES) | set(NEAREST) == set(npu_contract.RELEASES)
    assert not set(SOURCES) & set(NEAREST)
    assert sorted(p.stem for p in _LISTS.glob("*.json")) == sorted(npu_contract.RELEASES)
    for release in npu_contract.RELEASES:
        data = _committed(release)
        assert data["torch_npu_version"] == release
        assert data["source"]["pytorch_ref"] == (SOURCES.get(release) or NEAREST[release])
        assert len(data["source"]["op_plugin_commit"]) == 40
        assert ("nearest" in data["source"]) == (release in NEAREST)
        assert data["ops"] == sorted(set(data["ops"]))


@pytest.mark.parametrize("release", ["2.6.0", "2.6.0.post3", "2.6.0.post5", "2.7.1", "2.7.1.post2",
                                     "2.8.0", "2.8.0.post2", "2.9.0"])
def test_int64_shifts_are_acl_op_only_before_the_26_0_0_builds(release):
    assert _SHIFTS <= set(_committed(release)["ops"])


@pytest.mark.parametrize("release", ["2.7.1.post4", "2.8.0.post4", "2.9.0.post2", "2.10.0", "2.13.0"])
def test_shifts_have_aclnn_kernels_from_the_26_0_0_builds_on(release):
    assert not _SHIFTS & set(_committed(release)["ops"])


# -- (c), (d) the double enforces the list of the release it emulates ----------------------
def _capture(fn, *args):
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        out = fn(*args)
    g.replay()
    return out


def test_capture_refuses_an_acl_op_only_shift_and_takes_its_aclnn_rewrite():
    x = torch.arange(-20, 20, dtype=torch.int64)
    with fake_torch_npu.install(release="2.9.0") as fake:
        assert "aten::__rshift__.Scalar" in fake.runtime.aclop_only
        x >> 3                                         # eager: fine, as on the device
        with pytest.raises(RuntimeError, match=r"^Cannot run aclop operators during NPU graph capture: "
                                               r"aten::__rshift__\.Scalar"):
            _capture(lambda t: t >> 3, x)
        assert fake.runtime.capturing is None          # the failed capture was torn down
        assert torch.equal(_capture(lambda t: torch.div(t, 8, rounding_mode="floor"), x), x >> 3)


def test_newest_release_captures_the_shift():
    x = torch.arange(40, dtype=torch.int64)
    with fake_torch_npu.install() as fake:
        assert fake.runtime.aclop_only == load_ops(_LISTS, npu_contract.NEWEST)
        assert torch.equal(_capture(lambda t: t >> 3, x), x >> 3)


@pytest.mark.parametrize("release", [None, "2.9.0"])
def test_noise_hash_captures(release):
    seeds, positions = torch.tensor([7, 2**40 + 3]), torch.tensor([[0, 1, 2], [5, 6, 7]])
    expected = ops.counter_uniform_vocab(seeds, positions, 1, 11)
    with fake_torch_npu.install(release=release):
        got = _capture(ops.counter_uniform_vocab, seeds, positions, 1, 11)
    assert torch.equal(got, expected)
