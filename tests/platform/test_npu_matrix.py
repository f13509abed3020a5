"""The torch_npu support matrix, op by op: every supported release, checked offline.

Each release in `npu_contract.RELEASES` (every torch-npu on PyPI from 2.6.0 to 2.14.0) has a
committed snapshot (tests/platform/torch_npu_contracts/, extracted from its wheel like the
newest one, refreshed by `make npu-contracts`, checked against the wheels by
`make npu-contracts-check`; CI re-extracts the newest in test_npu_contract.py). Here, with
no download:

- every call in ops/backends/npu*.py and ascend_dspark/platform/ binds on every release,
  except call sites that `npu_caps.GATED_CALLS` names, and those only on a release where
  the capability probe refuses the op that reaches them;
- what the probe decides per release is the table below (the test says which release
  refuses or adapts what), and the schemas that differ between releases are exactly the
  ones ops/backends/npu_caps.py documents, so a new difference fails here first;
- on the test double built from an older release's schemas, the backend really does
  refuse / adapt: the refused op runs the reference with a message naming the release, the
  adapted one binds (the double's dispatcher rejects what the real one would) and matches
  the reference.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch

from ascend_dspark import platform
from ascend_dspark.platform.cpu import CpuPlatform
from ops import registry
from ops.backends.npu_caps import GATED_CALLS, Capabilities
from ops.backends.npu_schema import parse_arguments
from tests.fakes import fake_torch_npu
from tools import npu_contract

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = Path(__file__).with_name("torch_npu_contracts")
NPU_SOURCES = [ROOT / "ops" / "backends" / "npu.py", ROOT / "ops" / "backends" / "npu_attention.py",
               ROOT / "ops" / "backends" / "npu_sampling.py",
               ROOT / "ops" / "backends" / "npu_caps.py", ROOT / "ascend_dspark" / "platform"]

NO_SCATTER = {"2.6.0"}
NO_CACHE_MODE = {"2.6.0.post3", "2.6.0.post5", "2.7.1", "2.7.1.post2", "2.8.0", "2.8.0.post2", "2.9.0"}
TOP_K_TOP_P_REQUIRED = {"2.6.0"}


def expected(release: str) -> tuple[set[str], set[str]]:
    """(refused ops, adapted ops) on `release`: the matrix."""
    refused = {"kv_write"} if release in NO_SCATTER | NO_CACHE_MODE else set()
    adapted = {"top_k_top_p"} if release in TOP_K_TOP_P_REQUIRED else set()
    return refused, adapted


def snapshot(release: str) -> dict:
    return npu_contract.load(npu_contract.snapshot_path(SNAPSHOTS, release))


RELEASES = [pytest.param(r, id=r) for r in npu_contract.RELEASES]


def test_one_snapshot_per_release():
    files = {p.name for p in SNAPSHOTS.glob("torch_npu_*.json")}
    assert files == {npu_contract.snapshot_path(SNAPSHOTS, r).name for r in npu_contract.RELEASES}
    assert list(npu_contract.RELEASES) == sorted(npu_contract.RELEASES, key=npu_contract.release_key)
    assert npu_contract.RELEASES[0] == "2.6.0" and npu_contract.NEWEST == npu_contract.RELEASES[-1]
    for release in npu_contract.RELEASES:
        snap = snapshot(release)
        assert snap["torch_npu_version"] == release
        assert snap["wheel"] == f"torch_npu-{release}-cp311-cp311-manylinux_2_28_x86_64.whl" or \
            snap["wheel"].startswith(f"torch_npu-{release}-cp311-cp311-manylinux")
        assert len(snap["sha256"]) == 64 and snap["yaml_mismatch"] == []
        present = {o.split(".")[0] for o in snap["ops"]}
        assert present | set(snap["missing_ops"]) == set(npu_contract.SNAPSHOT_OPS)
        assert set(snap["python_api"]) | set(snap["missing_apis"]) == set(npu_contract.SNAPSHOT_APIS)
        assert snap["missing_apis"] == [], f"torch_npu {release} lacks torch.npu APIs the platform uses"


@pytest.mark.parametrize("release", RELEASES)
def test_calls_bind_or_are_gated(release):
    """Every torch_npu / torch.npu call binds on `release`, or sits behind a refusal there."""
    snap = snapshot(release)
    caps = Capabilities.from_contract(snap)
    refused, adapted = expected(release)
    assert set(caps.refused) == refused, f"torch_npu {release}: refused {caps.refused}"
    assert set(caps.adapted) == adapted, f"torch_npu {release}: adapted {caps.adapted}"
    assert caps.top_k_top_p_optional == (release not in TOP_K_TOP_P_REQUIRED)
    for why in caps.refused.values():
        assert release in why
    stats: dict = {}
    violations = npu_contract.check_calls(NPU_SOURCES, snap, stats)
    assert stats["calls"] >= 40
    for v in violations:
        assert GATED_CALLS.get(v.target) in caps.refused, f"binds nowhere reachable on {release}: {v}"
    flagged = {GATED_CALLS[v.target] for v in violations}
    assert flagged == set(caps.refused), "a refusal without a failing call is a needless fallback"


def _used(snap: dict, name: str) -> dict:
    return {k: v for k, v in snap["ops"].items() if k.split(".")[0] == name}


def test_schemas_differ_only_where_documented():
    """Between releases only these pinned schemas / APIs change (ops/backends/npu_caps.py's table)."""
    newest = snapshot(npu_contract.NEWEST)
    differs: dict[str, set[str]] = {}
    for release in npu_contract.RELEASES:
        snap = snapshot(release)
        for name in npu_contract.SNAPSHOT_OPS:
            if _used(snap, name) != _used(newest, name):
                differs.setdefault(name, set()).add(release)
        for name in npu_contract.SNAPSHOT_APIS:
            if snap["python_api"].get(name) != newest["python_api"][name]:
                differs.setdefault(f"torch.npu.{name}", set()).add(release)
    old_lines = {"2.6.0", "2.6.0.post3", "2.6.0.post5", "2.7.1", "2.7.1.post2", "2.8.0", "2.8.0.post2", "2.9.0"}
    bsh_default = old_lines | {"2.7.1.post4", "2.7.1.post6", "2.8.0.post4", "2.8.0.post5", "2.9.0.post2",
                               "2.9.0.post4", "2.9.1", "2.10.0", "2.10.0.post2"}
    assert differs == {
        "npu_scatter_pa_kv_cache": NO_SCATTER | NO_CACHE_MODE,
        "npu_top_k_top_p": TOP_K_TOP_P_REQUIRED,
        "npu_rotary_mul": old_lines,                  # no `rotate=` (never passed)
        "npu_apply_rotary_pos_emb": bsh_default,      # layout default 'BSH' (not called)
        "torch.npu.Event": old_lines,                 # no ipc_handle / from_ipc_handle (not used)
        "torch.npu.NPUGraph": old_lines,              # no debug_dump / super_kernel_optimize (not used)
    }
    # what we call binds the same way on all of them: same arguments, same outputs
    for release in npu_contract.RELEASES:
        snap = snapshot(release)
        for name in ("npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_fused_infer_attention_score",
                     "_npu_fused_infer_attention_score_get_max_workspace"):
            assert _used(snap, name) == _used(newest, name), (release, name)
        rotary = parse_arguments(snap["ops"]["npu_rotary_mul"])
        assert list(rotary)[:4] == ["input", "r1", "r2", "rotary_mode"]
        for api in ("graph", "graph_task_group_begin", "graph_task_group_end", "graph_task_update_begin",
                    "graph_task_update_end", "ExternalEvent", "Stream", "get_soc_version"):
            assert snap["python_api"][api] == newest["python_api"][api], (release, api)
        npu_graph = snap["python_api"]["NPUGraph"]
        for method in ("capture_begin", "capture_end", "replay", "reset"):
            assert npu_graph["methods"][method] == newest["python_api"]["NPUGraph"]["methods"][method]


def test_probe_reads_the_dispatcher_schema():
    """`Capabilities.probe` reads `torch_npu.<op>.default._schema` (namespaced, torch's own
    formatting) and decides as from the snapshot's string."""
    for release in ("2.6.0", "2.7.1", npu_contract.NEWEST):
        with fake_torch_npu.install(release=release) as fake:
            probed = Capabilities.probe(fake.module)
        assert probed == Capabilities.from_contract(snapshot(release)), release



# -- the backend on older releases' schemas (the double) ----------------------------------
def _group_representatives() -> list:
    """One release per distinct set of the pinned schemas (the others behave identically)."""
    seen: dict[str, str] = {}
    for release in npu_contract.RELEASES:
        snap = snapshot(release)
        key = repr(sorted(snap["ops"].items()))
        seen.setdefault(key, release)
    return [pytest.param(r, id=r) for r in seen.values()]


@pytest.fixture
def npu_backend(request, monkeypatch):
    """(release, ops.backends.npu, ops.backends.npu_sampling) imported against the double of
    `release` (the global platform stays CPU, as in tests/ops/test_npu_backend.py)."""
    release = request.param
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(platform, "_current", CpuPlatform())
    with fake_torch_npu.install(release=release) as fake:
        fake_torch_npu.unload_backend("npu")
        backend = importlib.import_module("ops.backends.npu")
        sampling = importlib.import_module("ops.backends.npu_sampling")
        assert backend.torch_npu is fake.module and fake.module.__version__ == release
        yield release, backend, sampling
    assert not {"ops.backends.npu", "ops.backends.npu_sampling"} & set(sys.modules)


@pytest.mark.parametrize("npu_backend", _group_representatives(), indirect=True)
def test_backend_refuses_or_adapts_on_each_release(npu_backend, caplog):
    release, backend, sampling = npu_backend
    refused, adapted = expected(release)
    assert set(backend.CAPS.refused) == refused and set(sampling.CAPS.adapted) == adapted
    torch.manual_seed(0)

    # kv_write: the fused scatter where it binds, the reference (named release) where refused
    blocks, block, heads, dim = 4, 16, 2, 64
    k_cache = torch.zeros(blocks, block, heads, dim, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(2, 3, heads, dim, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.tensor([[0, 1, 2], [17, 18, 19]])
    caplog.set_level(logging.WARNING, logger="ops")
    backend.kv_write(k_cache, v_cache, k, v, slots)
    flat_k = k_cache.view(-1, heads, dim)
    assert torch.equal(flat_k[slots.reshape(-1)], k.reshape(-1, heads, dim))
    fell_back = {op for (op, _why) in backend.fallbacks()}
    assert ("kv_write" in fell_back) == ("kv_write" in refused)
    if "kv_write" in refused:
        assert any(release in r.getMessage() and "kv_write" in r.getMessage() for r in caplog.records)

    # top_k_top_p: binds with only k, only p, or both, on every release
    logits = torch.randn(3, 100)
    temperature = torch.tensor([0.7, 1.0, 1.3])
    top_k = torch.tensor([5, 0, 50])
    top_p = torch.tensor([0.9, 0.5, 1.0])
    reference = sampling.apply_temperature_top_k_top_p.reference
    for kk, pp in ((top_k, None), (None, top_p), (top_k, top_p)):
        got = sampling.apply_temperature_top_k_top_p_npu(logits, temperature, kk, pp)
        want = reference(logits, temperature, kk, pp)
        torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(want, -1))

    # the ops every release binds unchanged still run fused
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    before = dict(backend.fallbacks())
    backend.rms_norm(x, w, 1e-6)
    backend.silu_and_mul(x, x)
    assert backend.fallbacks() == before


# -- the platform: graph task update API by capability ---------------------------------------
@pytest.mark.parametrize("release", ["2.6.0", npu_contract.NEWEST])
def test_platform_graphs_follow_the_graph_task_api(monkeypatch, caplog, release):
    """Every supported release has the graph task update API (graphs on); a torch_npu without
    one of its functions gets eager steps and a warning naming the release and what is missing."""
    from ascend_dspark.platform import npu as npu_platform

    fake_torch_npu.patch_npu_platform(monkeypatch)
    monkeypatch.setattr(platform, "_current", platform._current)
    with fake_torch_npu.install(release=release) as fake:
        assert npu_platform.missing_graph_apis() == []
        p = npu_platform.NpuPlatform()
        assert p.supports_graphs and p.graph_steps
        monkeypatch.delattr(fake.npu, "graph_task_update_begin")
        with caplog.at_level(logging.WARNING, logger=npu_platform.__name__):
            p = npu_platform.NpuPlatform()
        assert not p.supports_graphs and not p.graph_steps
        message = " ".join(r.getMessage() for r in caplog.records if r.name == npu_platform.__name__)
        assert release in message and "graph_task_update_begin" in message
    fake_torch_npu.unload_backend("npu")
