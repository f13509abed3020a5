"""Our Ascend code against torch_npu's real API, checked without an NPU.

(a) the newest release's committed snapshot equals what its wheel says (downloaded and
    regenerated each run; every other release is checked offline in test_npu_matrix.py and
    against its wheel by `make npu-contracts-check`);
(b) the AST checker (tools/npu_contract/check.py) passes on our code and catches the known kinds of drift;
(c) the torch.library double rejects the same wrong calls the real dispatcher would;
(d) the fake torch.npu has the real Python signatures.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch

from tests.fakes import fake_npu_runtime, fake_torch_npu
from tools import npu_contract
from tools.npu_contract.cli import main
from tools.npu_contract.contract import _codegen_rewrite

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = npu_contract.snapshot_path(Path(__file__).with_name("torch_npu_contracts"), npu_contract.NEWEST)
REQUIRE_ENV = "ASCEND_DSPARK_REQUIRE_CONTRACT"  # set to 1 in CI: no skipping when offline


@pytest.fixture(scope="module")
def contract() -> dict:
    return npu_contract.load(SNAPSHOT)


@pytest.fixture(scope="module")
def wheel(contract) -> Path:
    try:
        return npu_contract.fetch_wheel(contract["torch_npu_version"])
    except npu_contract.WheelUnavailable as exc:
        if exc.network and os.environ.get(REQUIRE_ENV) != "1":
            pytest.skip(f"torch-npu wheel not downloadable (no network?): {str(exc).splitlines()[0]}")
        raise


# -- (a) snapshot == wheel ---------------------------------------------------------------
def test_snapshot_matches_newest_wheel(wheel, contract):
    full = npu_contract.extract_contract(wheel)
    assert full["yaml_mismatch"] == [], "the .so schemas and the codegen YAML disagree"
    assert len(full["ops"]) > 400
    regenerated = npu_contract.snapshot(full)
    diff = npu_contract.diff_contracts(contract, regenerated)
    assert not diff, (f"torch_npu {npu_contract.NEWEST} contract drifted; regenerate with `make npu-contracts` "
                      "and review every change:\n" + "\n".join(diff))


def test_snapshot_pins_what_we_use(contract):
    assert {o.split(".")[0] for o in contract["ops"]} == set(npu_contract.SNAPSHOT_OPS)
    assert "npu_fused_infer_attention_score.out" in contract["ops"]
    assert set(contract["python_api"]) == set(npu_contract.SNAPSHOT_APIS)
    assert contract["ops"]["npu_rms_norm"].startswith("npu_rms_norm(Tensor input, Tensor gamma, float epsilon=")


def test_codegen_rewrite_matches_torchnpugen():
    rewrite = _codegen_rewrite
    assert rewrite("npu_swiglu(Tensor self, int dim=-1) -> Tensor") == "npu_swiglu(Tensor input, int dim=-1) -> Tensor"
    assert rewrite("f.out(Tensor q, *, Tensor? w=None, Tensor(a!) o, Tensor(b!) l) -> (Tensor(a!), Tensor(b!))") \
        == "f.out(Tensor q, *, Tensor? w=None, Tensor[] out) -> (Tensor, Tensor)"
    single = "g.value(Tensor k, *, Tensor(a!) key_cache) -> Tensor(a!)"
    assert rewrite(single) == single


# -- (b) AST checker -----------------------------------------------------------------------
DRIFT_SAMPLE = '''
import torch
import torch_npu


def step(x, w, q, k, v, cos, sin, g):
    torch_npu.npu_rms_norm(x, w, eps=1e-6)
    torch_npu.npu_fused_infer_attention_score(q, k, v, 8)
    torch_npu.npu_rotary_mul(self=q, r1=cos, r2=sin)
    torch_npu.npu_fused_infer_attention_score(q, k, v, num_head=8)
    torch_npu.npu_rms_norm_fast(x, w)
    torch_npu.npu_rms_norm(x)
    torch.ops.npu.npu_swiglu(x, dim=-1, approximate=True)
    torch.npu.NPUGraph(keep_graph=True)
    torch.npu.synchronise()
    torch.npu.graph(g, None, None, False, "global", 1)
'''
# line (in DRIFT_SAMPLE) -> what the report must say
EXPECTED = {
    7: "unknown keyword 'eps'",
    8: "4 positional arguments, at most 3",
    9: "unknown keyword 'self'",
    10: "unknown keyword 'num_head'",
    11: "unknown op",
    12: "missing required argument 'gamma'",
    13: "unknown keyword 'approximate'",
    14: "unknown keyword 'keep_graph'",
    15: "not in torch.npu",
    16: "6 positional arguments, at most 5",
}

GOOD_SAMPLE = '''
import torch
import torch_npu
import torch_npu as tnpu
from torch_npu import npu_swiglu


def step(x, r, w, q, k, v, cos, sin, kc, vc, slots, logits, p, topk, mask, out, ws):
    y, rstd = torch_npu.npu_rms_norm(x, w, 1e-6)
    y, rstd, s = tnpu.npu_add_rms_norm(x, r, w, epsilon=1e-6)
    h = npu_swiglu(x, dim=-1)
    q2 = torch_npu.npu_rotary_mul(input=q, r1=cos, r2=sin)
    torch_npu.npu_apply_rotary_pos_emb(q, k, cos, sin, "BSND")
    torch_npu.npu_fused_infer_attention_score(q, k, v, num_heads=8, input_layout="BSND", atten_mask=mask,
                                              actual_seq_lengths_kv=[3], scale=0.125)
    ws = torch_npu._npu_fused_infer_attention_score_get_max_workspace(q, k, v, num_heads=8)
    torch_npu.npu_fused_infer_attention_score(q, k, v, num_heads=8, workspace=ws, out=out)
    torch_npu.npu_fused_infer_attention_score.out(q, k, v, num_heads=8, out=out)
    torch.ops.npu.npu_scatter_pa_kv_cache(k, v, kc, vc, slots, cache_mode="Norm")
    torch_npu.npu_top_k_top_p(logits, k=topk, p=p)
    side = torch.npu.Stream(0)
    side.wait_stream(torch.npu.current_stream())
    with torch.npu.stream(side):
        pass
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g, pool=torch.npu.graph_pool_handle(), auto_dispatch_capture=True):
        pass
    g.update(cpu_update_input=[{"actual_seq_lengths_kv": [4]}])
    torch.npu.graph_task_update_begin(side, None)
    torch.npu.Event(enable_timing=True)
    free, total = torch.npu.mem_get_info(0)
    make = torch.npu.Event
'''


def test_checker_passes_on_our_code(contract):
    stats: dict = {}
    violations = npu_contract.check_calls([ROOT / "ascend_dspark", ROOT / "ops"], contract, stats)
    assert violations == [], "\n".join(map(str, violations))
    assert stats["calls"] >= 15, f"expected the NPU platform's torch.npu calls to be found, got {stats}"


def test_checker_covers_the_npu_ops_backend(tmp_path, contract):
    """ops/backends/npu.py and npu_attention.py are where the torch_npu op calls live: every
    one is seen and binds."""
    backend = ROOT / "ops" / "backends" / "npu.py"
    attention = ROOT / "ops" / "backends" / "npu_attention.py"
    stats: dict = {}
    assert npu_contract.check_calls([backend, attention], contract, stats) == []
    source = backend.read_text() + attention.read_text()
    ops_called = {op for op in {o.split(".")[0] for o in contract["ops"]} if f"torch_npu.{op}(" in source}
    assert ops_called == {"npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_rotary_mul",
                          "npu_scatter_pa_kv_cache", "npu_fused_infer_attention_score",
                          "_npu_fused_infer_attention_score_get_max_workspace"}
    assert "torch_npu.npu_fused_infer_attention_score.out(" in source      # the graph-capture form
    assert stats["calls"] >= len(ops_called)
    drifted = tmp_path / "npu.py"  # the same file with one keyword misspelt must be caught
    drifted.write_text(source.replace("epsilon=float(eps))\n    return y\n", "eps=float(eps))\n    return y\n", 1))
    violations = npu_contract.check_calls([drifted], contract)
    assert len(violations) == 1 and "unknown keyword 'eps'" in violations[0].message, violations


def test_checker_covers_the_graph_task_update_and_soc_query(contract):
    """The calls the NPU platform needs for SoC choice and graph task updates are pinned and bind."""
    platform_src = ROOT / "ascend_dspark" / "platform" / "npu.py"
    assert npu_contract.check_calls([platform_src], contract) == []
    source = platform_src.read_text()
    for call in ("torch.npu.get_soc_version()", "torch.npu.graph_task_group_begin(", "torch.npu.graph_task_group_end(",
                 "torch.npu.graph_task_update_begin(", "torch.npu.graph_task_update_end(", "torch.npu.ExternalEvent()"):
        assert call in source, call
    assert contract["python_api"]["get_soc_version"] == {"defined_in": "torch_npu/npu/_backends.py",
                                                         "kind": "function", "call": "()"}
    assert "get_soc_version" not in contract["npu_all"], "reachable, but not in torch_npu.npu.__all__"


def test_checker_reads_the_accelerator_as_torch_npu(tmp_path, contract):
    """NpuPlatform's streams, events, pools and memory calls live in the accelerator base class,
    as `self.device_module.<api>(...)`: the checker binds them as torch.npu calls."""
    accelerator = ROOT / "ascend_dspark" / "platform" / "accelerator.py"
    stats: dict = {}
    assert npu_contract.check_calls([accelerator], contract, stats) == []
    assert stats["calls"] >= 12, f"the accelerator's torch.npu calls were not found: {stats}"
    drifted = tmp_path / "accelerator.py"
    drifted.write_text(accelerator.read_text().replace("Event(enable_timing=", "Event(timing=", 1))
    (violation,) = npu_contract.check_calls([drifted], contract)
    assert violation.target == "torch.npu.Event" and "unknown keyword 'timing'" in violation.message


def test_checker_catches_drift(tmp_path, contract):
    sample = tmp_path / "drift.py"
    sample.write_text(DRIFT_SAMPLE)
    found = {}
    for v in npu_contract.check_calls([sample], contract):
        found.setdefault(v.line, []).append(v.message)
    for line, expected in EXPECTED.items():
        assert any(expected in m for m in found.get(line, [])), f"line {line}: want {expected!r}, got {found.get(line)}"
    assert set(found) == set(EXPECTED), f"unexpected reports: {found}"
    assert any("missing required argument 'input'" in m for m in found[9])


def test_checker_accepts_correct_calls(tmp_path, contract):
    sample = tmp_path / "good.py"
    sample.write_text(GOOD_SAMPLE)
    stats: dict = {}
    violations = npu_contract.check_calls([sample], contract, stats)
    assert violations == [], "\n".join(map(str, violations))
    assert stats["calls"] >= 20


def test_cli_calls_mode(tmp_path, capsys):
    sample = tmp_path / "drift.py"
    sample.write_text(DRIFT_SAMPLE)
    assert main(["--calls", str(sample), "--contract", str(SNAPSHOT)]) == 1
    assert "unknown keyword 'eps'" in capsys.readouterr().out
    assert main(["--calls", str(ROOT / "ascend_dspark"), "--contract", str(SNAPSHOT)]) == 0


# -- (c) the torch.library double binds like the real dispatcher ---------------------------
@pytest.fixture
def fake():
    with fake_torch_npu.install() as installed:
        yield installed.module


def _tensors():
    return {"x": torch.randn(2, 64), "w": torch.ones(64), "q": torch.randn(1, 2, 4, 64, dtype=torch.float16),
            "k": torch.randn(1, 3, 4, 64, dtype=torch.float16), "v": torch.randn(1, 3, 4, 64, dtype=torch.float16),
            "cos": torch.ones(1, 2, 1, 64, dtype=torch.float16), "sin": torch.zeros(1, 2, 1, 64, dtype=torch.float16)}


def test_double_rejects_drift(fake):
    t = _tensors()
    x, w, q, k, v, cos, sin = t.values()
    bad = [
        (lambda: fake.npu_rms_norm(x, w, eps=1e-6), "Unknown keyword argument 'eps'"),
        (lambda: fake.npu_fused_infer_attention_score(q, k, v, 8), "failed to match any schema"),
        (lambda: fake.npu_rotary_mul(self=q, r1=cos, r2=sin), "input"),
        (lambda: fake.npu_fused_infer_attention_score(q, k, v, num_head=8), "failed to match any schema"),
        (lambda: fake.npu_rms_norm(x), "missing value for argument 'gamma'"),
        (lambda: torch.ops.npu.npu_swiglu(x, dim=-1, approximate=True), "expected at most 2 argument"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()
    with pytest.raises(AttributeError):
        fake.npu_rms_norm_fast(x, w)


def test_double_accepts_correct_calls(fake):
    t = _tensors()
    x, w, q, k, v, cos, sin = t.values()
    y, rstd = fake.npu_rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and rstd.shape == (2, 1) and rstd.dtype == torch.float32
    assert len(fake.npu_add_rms_norm(x, x, w, epsilon=1e-6)) == 3
    assert fake.npu_swiglu(x, dim=-1).shape == (2, 32)
    assert fake.npu_rotary_mul(input=q, r1=cos, r2=sin).shape == q.shape
    assert fake.npu_apply_rotary_pos_emb(q, k[:, :2].contiguous(), cos, sin, "BSND")[0] is q
    attn, lse = fake.npu_fused_infer_attention_score(q, k, v, num_heads=4, input_layout="BSND", scale=0.125)
    assert attn.shape == q.shape and lse.shape == (1,)
    ws = fake._npu_fused_infer_attention_score_get_max_workspace(q, k, v, num_heads=4, input_layout="BSND")
    out = [torch.empty_like(q), torch.empty(1)]
    res = fake.npu_fused_infer_attention_score(q, k, v, num_heads=4, input_layout="BSND", scale=0.125,
                                              workspace=ws, out=out)
    assert res[0] is out[0] and torch.equal(out[0], attn)
    logits = torch.randn(2, 50)
    assert fake.npu_top_k_top_p(logits, k=torch.tensor([3, 5], dtype=torch.int32)).shape == logits.shape


# -- (d) the fake torch.npu has the real signatures -----------------------------------------
def _sig(obj) -> str:
    sig = inspect.signature(obj)
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=plain, return_annotation=inspect.Signature.empty))


def test_fake_python_api_signatures_equal_snapshot(contract):
    snap = contract["python_api"]
    public = {n for n in vars(fake_torch_npu.build_modules(contract)[1]) if not n.startswith("_")}
    assert public == set(snap), "the fake torch.npu must offer exactly the pinned APIs"
    for name, entry in snap.items():
        obj = fake_npu_runtime.API[name]
        assert _sig(obj) == entry["call"], f"torch.npu.{name}{_sig(obj)} != real {name}{entry['call']}"
        if entry["kind"] != "class":
            continue
        own = {m for m in vars(obj) if callable(vars(obj)[m]) or isinstance(vars(obj)[m], classmethod)}
        extra = {m for m in own if not m.startswith("_") and m not in entry["methods"]}
        assert not extra, f"fake {name} has methods the real one lacks: {extra}"
        for method, real in entry["methods"].items():
            assert method in vars(obj), f"fake {name} lacks {method}{real}"
            fn = vars(obj)[method]
            fn = fn.__func__ if isinstance(fn, classmethod) else fn
            assert _sig(fn) == real, f"{name}.{method}{_sig(fn)} != real {real}"


def test_fake_torch_npu_exposes_exactly_the_pinned_ops(contract, fake):
    ops = {o.split(".")[0] for o in contract["ops"]}
    assert {n for n in vars(fake) if not n.startswith("__") and n != "npu"} == ops
    for op in ops:
        assert getattr(fake, op) is getattr(torch.ops.npu, op)  # torch_npu.x IS torch.ops.npu.x
    assert fake.__doc__.startswith("TEST DOUBLE") and fake.npu.__doc__.startswith("TEST DOUBLE")
