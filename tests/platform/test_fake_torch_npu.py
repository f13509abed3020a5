"""The torch_npu test double itself: kernels follow the documented semantics, graphs behave like graphs.

If the double were wrong, NPU-path tests built on it would pass for the wrong reasons,
so its reference kernels are checked against independent formulas (SDPA, ops/norm.py)
and its NPUGraph against the device rules it claims to emulate.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from ops.norm import rms_norm as _rms_norm_entry
from tests.fakes import fake_torch_npu


@pytest.fixture
def tnpu():
    with fake_torch_npu.install() as fake:
        yield fake.module


rms_norm = _rms_norm_entry.reference  # the plain-torch spec, not the platform-dispatched entry


def _half(x):
    return x.to(torch.float16)


# -- norms, activation, rope ---------------------------------------------------------------
def test_rms_norms_match_reference(tnpu):
    x, r, w = torch.randn(3, 5, 64), torch.randn(3, 5, 64), torch.rand(64) + 0.5
    y, rstd = tnpu.npu_rms_norm(x, w, epsilon=1e-5)
    torch.testing.assert_close(y, rms_norm(x, w, 1e-5))
    assert rstd.shape == (3, 5, 1) and rstd.dtype == torch.float32
    y2, rstd2, summed = tnpu.npu_add_rms_norm(_half(x), _half(r), _half(w), 1e-5)
    torch.testing.assert_close(summed, _half(x) + _half(r))
    torch.testing.assert_close(y2.float(), rms_norm((_half(x).float() + _half(r).float()), w, 1e-5),
                               atol=2e-2, rtol=1e-2)
    assert y2.dtype == torch.float16 and rstd2.dtype == torch.float32


def test_swiglu_is_silu_of_first_half_times_second(tnpu):
    x = torch.randn(4, 2 * 48)
    torch.testing.assert_close(tnpu.npu_swiglu(x), F.silu(x[:, :48]) * x[:, 48:])
    torch.testing.assert_close(tnpu.npu_swiglu(x.T.contiguous(), dim=0), (F.silu(x[:, :48]) * x[:, 48:]).T)


def _cos_sin(batch, seq, dim, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    ang = torch.arange(seq).float()[:, None] * inv[None]
    emb = torch.cat((ang, ang), dim=-1)[None, :, None, :].expand(batch, seq, 1, dim)
    return emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()


def test_rotary_mul_half_and_apply_in_place(tnpu):
    q = torch.randn(2, 3, 4, 64)
    cos, sin = _cos_sin(2, 3, 64)
    rotated = torch.cat((-q[..., 32:], q[..., :32]), dim=-1)
    torch.testing.assert_close(tnpu.npu_rotary_mul(q, cos, sin), q * cos + rotated * sin)
    q_ref, k = q.clone(), torch.randn(2, 3, 1, 64)
    k_ref = k.clone()
    q_out, k_out = tnpu.npu_apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out is q and k_out is k, "the real op updates query and key in place"
    torch.testing.assert_close(q, tnpu.npu_rotary_mul(q_ref, cos, sin))
    torch.testing.assert_close(k, tnpu.npu_rotary_mul(k_ref, cos, sin))


def test_rope_hardware_limits(tnpu, monkeypatch):
    q, k = torch.randn(1, 2, 2, 32), torch.randn(1, 2, 2, 32)
    cos, sin = _cos_sin(1, 2, 32)
    with pytest.raises(ValueError, match="head_dim 64 or 128"):
        tnpu.npu_apply_rotary_pos_emb(q, k, cos, sin)
    fake_torch_npu.set_enforce_hw_constraints(monkeypatch, False)
    tnpu.npu_apply_rotary_pos_emb(q, k, cos, sin)
    with pytest.raises(NotImplementedError, match="'layout'"):
        tnpu.npu_apply_rotary_pos_emb(q, k, cos, sin, layout="BNSD")
    with pytest.raises(NotImplementedError, match="'rotate'"):
        tnpu.npu_rotary_mul(q, cos, sin, rotate=torch.eye(32))


# -- fused infer attention -----------------------------------------------------------------
def _sdpa_bsnd(q, k, v, scale, mask=None):
    """Reference: q (B,S,N,D), k/v (B,S,Nkv,D), mask bool True = attend."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))
    kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


def _qkv(batch=2, q_len=3, kv_len=7, heads=4, kv_heads=2, dim=64):
    return (_half(torch.randn(batch, q_len, heads, dim)), _half(torch.randn(batch, kv_len, kv_heads, dim)),
            _half(torch.randn(batch, kv_len, kv_heads, dim)))


def test_fia_matches_sdpa_across_layouts(tnpu):
    q, k, v = _qkv()
    ref = _sdpa_bsnd(q, k, v, 0.125)
    kw = dict(num_heads=4, num_key_value_heads=2, scale=0.125)
    bsnd, lse = tnpu.npu_fused_infer_attention_score(q, k, v, input_layout="BSND", softmax_lse_flag=True, **kw)
    torch.testing.assert_close(bsnd.float(), ref, atol=2e-3, rtol=2e-3)
    scores = (q.float().transpose(1, 2) @ k.float().transpose(1, 2).repeat_interleave(2, 1).transpose(-1, -2)) * 0.125
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1, keepdim=True))
    bnsd, _ = tnpu.npu_fused_infer_attention_score(*(t.transpose(1, 2).contiguous() for t in (q, k, v)),
                                                   input_layout="BNSD", **kw)
    torch.testing.assert_close(bnsd.transpose(1, 2), bsnd)
    bsh, _ = tnpu.npu_fused_infer_attention_score(*(t.flatten(-2) for t in (q, k, v)), input_layout="BSH", **kw)
    torch.testing.assert_close(bsh, bsnd.flatten(-2))


def test_fia_mask_true_means_masked_out(tnpu):
    q, k, v = _qkv(batch=1, q_len=3, kv_len=5)
    masked = torch.rand(1, 1, 3, 5) < 0.4
    masked[..., 0] = False  # keep one visible key per row
    out, _ = tnpu.npu_fused_infer_attention_score(q, k, v, num_heads=4, num_key_value_heads=2, scale=0.125,
                                                  input_layout="BSND", atten_mask=masked)
    torch.testing.assert_close(out.float(), _sdpa_bsnd(q, k, v, 0.125, mask=~masked), atol=2e-3, rtol=2e-3)


def test_fia_actual_seq_lengths_kv_hides_the_tail(tnpu):
    q, k, v = _qkv(batch=2, q_len=1, kv_len=6)
    out, _ = tnpu.npu_fused_infer_attention_score(q, k, v, num_heads=4, num_key_value_heads=2, scale=0.125,
                                                  input_layout="BSND", actual_seq_lengths_kv=[2, 6])
    torch.testing.assert_close(out[:1].float(), _sdpa_bsnd(q[:1], k[:1, :2], v[:1, :2], 0.125), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out[1:].float(), _sdpa_bsnd(q[1:], k[1:], v[1:], 0.125), atol=2e-3, rtol=2e-3)


def test_fia_sparse_mode_3_is_right_down_causal(tnpu):
    q, k, v = _qkv(batch=1, q_len=3, kv_len=5)
    compressed = torch.ones(2048, 2048, dtype=torch.bool).triu(1).to(torch.int8)
    out, _ = tnpu.npu_fused_infer_attention_score(q, k, v, num_heads=4, num_key_value_heads=2, scale=0.125,
                                                  input_layout="BSND", sparse_mode=3, atten_mask=compressed)
    visible = torch.arange(5)[None, :] <= torch.arange(3)[:, None] + 2  # the 3 queries are the last 3 tokens
    torch.testing.assert_close(out.float(), _sdpa_bsnd(q, k, v, 0.125, mask=visible), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="2048"):
        tnpu.npu_fused_infer_attention_score(q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BSND",
                                             sparse_mode=3, atten_mask=compressed[:5, :5])


def test_fia_refuses_what_it_does_not_model(tnpu):
    q, k, v = _qkv()
    kw = dict(num_heads=4, num_key_value_heads=2, input_layout="BSND")
    with pytest.raises(NotImplementedError, match="'query_padding_size'"):
        tnpu.npu_fused_infer_attention_score(q, k, v, query_padding_size=torch.zeros(2, dtype=torch.long), **kw)
    with pytest.raises(NotImplementedError, match="'input_layout'"):
        tnpu.npu_fused_infer_attention_score(q, k, v, num_heads=4, input_layout="TND")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        tnpu.npu_fused_infer_attention_score(q.float(), k.float(), v.float(), **kw)
    with pytest.raises(ValueError, match="N axis"):
        tnpu.npu_fused_infer_attention_score(q, k, v, num_heads=8, num_key_value_heads=2, input_layout="BSND")


# -- page attention ------------------------------------------------------------------------
def _paged(batch=2, q_len=3, heads=4, kv_heads=2, dim=64, block=128, table_width=2, num_blocks=6, seed=0):
    """q, paged caches (blocknum, block, N, D), a block table using distinct blocks, and the
    same K/V gathered per row (B, table_width * block, N, D)."""
    g = torch.Generator().manual_seed(seed)
    q = _half(torch.randn(batch, q_len, heads, dim, generator=g))
    k_cache = _half(torch.randn(num_blocks, block, kv_heads, dim, generator=g))
    v_cache = _half(torch.randn(num_blocks, block, kv_heads, dim, generator=g))
    table = torch.randperm(num_blocks, generator=g)[: batch * table_width].view(batch, table_width).int()
    k_rows = k_cache[table.long()].flatten(1, 2)
    v_rows = v_cache[table.long()].flatten(1, 2)
    return q, k_cache, v_cache, table, k_rows, v_rows


def test_fia_page_attention_reads_through_the_block_table(tnpu):
    q, k_cache, v_cache, table, k_rows, v_rows = _paged()
    kv_lens = [150, 256]
    kw = dict(num_heads=4, num_key_value_heads=2, scale=0.125, input_layout="BSND")
    out, _ = tnpu.npu_fused_infer_attention_score(
        q, k_cache.flatten(2), v_cache.flatten(2), block_table=table, block_size=128,
        actual_seq_lengths_kv=kv_lens, **kw)
    for b, n in enumerate(kv_lens):
        torch.testing.assert_close(out[b:b + 1].float(), _sdpa_bsnd(q[b:b + 1], k_rows[b:b + 1, :n],
                                                                    v_rows[b:b + 1, :n], 0.125),
                                   atol=2e-3, rtol=2e-3)
    # an explicit (B, 1, Q_S, KV_S) mask on top, KV_S = table width * block_size
    masked = torch.rand(2, 1, 3, 256) < 0.3
    masked[..., 0] = False
    out_m, _ = tnpu.npu_fused_infer_attention_score(
        q, k_cache.flatten(2), v_cache.flatten(2), block_table=table, block_size=128, atten_mask=masked,
        actual_seq_lengths_kv=[256, 256], **kw)
    torch.testing.assert_close(out_m.float(), _sdpa_bsnd(q, k_rows, v_rows, 0.125, mask=~masked), atol=2e-3, rtol=2e-3)
    # decode (Q_S == 1) accepts 16-aligned blocks; BNSD queries also take (blocknum, N, block, D) caches
    q1, k16, v16, t16, k16_rows, v16_rows = _paged(q_len=1, block=16, table_width=3, num_blocks=8)
    out1, _ = tnpu.npu_fused_infer_attention_score(
        q1.transpose(1, 2).contiguous(), k16.transpose(1, 2).contiguous(), v16.transpose(1, 2).contiguous(),
        block_table=t16, block_size=16, actual_seq_lengths_kv=[40, 48], num_heads=4, num_key_value_heads=2,
        scale=0.125, input_layout="BNSD")
    torch.testing.assert_close(out1[:1].transpose(1, 2).float(),
                               _sdpa_bsnd(q1[:1], k16_rows[:1, :40], v16_rows[:1, :40], 0.125), atol=2e-3, rtol=2e-3)


def test_fia_page_attention_rules(tnpu, monkeypatch):
    q, k_cache, v_cache, table, _, _ = _paged()
    key, value = k_cache.flatten(2), v_cache.flatten(2)
    kw = dict(num_heads=4, num_key_value_heads=2, input_layout="BSND")

    def call(**over):
        args = dict(block_table=table, block_size=128, actual_seq_lengths_kv=[200, 200], **kw)
        args.update(over)
        return tnpu.npu_fused_infer_attention_score(q, args.pop("key", key), args.pop("value", value), **args)

    call()
    with pytest.raises(ValueError, match="needs actual_seq_lengths_kv"):
        call(actual_seq_lengths_kv=None)
    with pytest.raises(TypeError, match="int32"):
        call(block_table=table.long())
    with pytest.raises(ValueError, match="multiple of 128"):        # Q_S > 1
        call(key=k_cache[:, :64].flatten(2).contiguous(), value=v_cache[:, :64].flatten(2).contiguous(),
             block_size=64, actual_seq_lengths_kv=[100, 100])
    with pytest.raises(ValueError, match="BNSD/TND"):                # (blocknum, N, block, D) with a BSND query
        call(key=k_cache.transpose(1, 2).contiguous(), value=v_cache.transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="outside"):                 # block ids are not checked by the kernel
        call(block_table=torch.tensor([[0, 9], [1, 2]], dtype=torch.int32))
    call(block_table=torch.tensor([[0, 9], [1, 2]], dtype=torch.int32), actual_seq_lengths_kv=[100, 200])
    with pytest.raises(ValueError, match=r"\[0, 256\]"):
        call(actual_seq_lengths_kv=[300, 10])
    with pytest.raises(ValueError, match="need 4 blocks"):
        tnpu.npu_fused_infer_attention_score(q, key[:3].contiguous(), value[:3].contiguous(), block_table=table,
                                             block_size=128, actual_seq_lengths_kv=[256, 129], **kw)
    with pytest.raises(ValueError, match="KV_S=256"):                # mask narrower than the blocks read
        call(atten_mask=torch.zeros(2, 1, 3, 128, dtype=torch.bool), actual_seq_lengths_kv=[256, 256])


# -- KV cache and sampling -----------------------------------------------------------------
def test_scatter_pa_kv_cache_writes_slots_in_place(tnpu):
    key, value = _half(torch.randn(3, 2, 8)), _half(torch.randn(3, 2, 4))
    key_cache, value_cache = _half(torch.zeros(4, 16, 2, 8)), _half(torch.zeros(4, 16, 2, 4))
    slots = torch.tensor([0, 17, 63], dtype=torch.int32)
    with pytest.raises(TypeError, match="float16/bfloat16/int8"):  # float32 caches are Ascend 950 only
        tnpu.npu_scatter_pa_kv_cache(key.float(), value.float(), key_cache.float(), value_cache.float(), slots,
                                     cache_mode="Norm")
    with pytest.raises(NotImplementedError, match="'cache_mode'.*PA_NZ"):
        tnpu.npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slots)  # default = NZ caches
    assert tnpu.npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slots, cache_mode="Norm") is None
    assert torch.equal(key_cache[1, 1], key[1]) and torch.equal(value_cache[3, 15], value[2])
    assert key_cache.count_nonzero() == key.count_nonzero()
    with pytest.raises(ValueError, match="no -1 padding"):
        tnpu.npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, torch.tensor([0, 1, -1]), cache_mode="Norm")


def test_scatter_pa_kv_cache_rejects_duplicate_slots(tnpu):
    """The kernel leaves the winner of two writes to one row unspecified: the double refuses."""
    key, value = _half(torch.randn(3, 2, 8)), _half(torch.randn(3, 2, 8))
    key_cache, value_cache = _half(torch.zeros(4, 16, 2, 8)), _half(torch.zeros(4, 16, 2, 8))
    with pytest.raises(ValueError, match=r"duplicate slots \[17\]"):
        tnpu.npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, torch.tensor([17, 3, 17], dtype=torch.int32),
                                     cache_mode="Norm")
    assert key_cache.count_nonzero() == 0, "nothing is written"


def _top_k_top_p_reference(logits, p, k):
    """Descending, per row: keep the k best, then the best tokens while the mass above them < p."""
    out = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        order = logits[row].argsort(descending=True)[: int(k[row])]
        probs = torch.softmax(logits[row, order], dim=-1)
        above = torch.cumsum(probs, 0) - probs
        keep = order[above < p[row]]
        out[row, keep] = logits[row, keep]
    return out


def test_top_k_top_p_follows_the_documented_recipe(tnpu):
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    p = torch.tensor([0.5, 0.9, 1.0, 0.1])
    k = torch.tensor([5, 50, 100, 1], dtype=torch.int32)
    torch.testing.assert_close(tnpu.npu_top_k_top_p(logits, p, k), _top_k_top_p_reference(logits, p, k))
    only_k = tnpu.npu_top_k_top_p(logits, k=k)
    assert (only_k.isfinite().sum(-1) == k).all()
    with pytest.raises(TypeError, match="int32"):
        tnpu.npu_top_k_top_p(logits, k=k.long())
    with pytest.raises(ValueError, match="both be None"):
        tnpu.npu_top_k_top_p(logits)


# -- NPUGraph semantics --------------------------------------------------------------------
def _fia_args():
    q, k, v = _qkv(batch=1, q_len=1, kv_len=6)
    return q, k, v, dict(num_heads=4, num_key_value_heads=2, input_layout="BSND", scale=0.125)


def test_replay_uses_captured_tensors_not_python_names(tnpu):
    x = torch.ones(3)
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        y = x * 2
    x.copy_(torch.full((3,), 5.0))
    g.replay()
    assert torch.equal(y, torch.full((3,), 10.0))
    x = torch.zeros(3)  # rebinding: the graph still reads the old buffer, as on the device
    g.replay()
    assert torch.equal(y, torch.full((3,), 10.0))


def test_host_lists_are_baked_until_update(tnpu):
    q, k, v, kw = _fia_args()
    lens = [2]
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g, auto_dispatch_capture=True):
        out = tnpu.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=lens, **kw)
    lens[0] = 6  # mutating the host list after capture changes nothing
    g.replay()
    expect2, _ = tnpu.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=[2], **kw)
    assert torch.equal(out[0], expect2)
    g.update(cpu_update_input=[{"actual_seq_lengths_kv": [5]}])
    g.replay()
    expect5, _ = tnpu.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=[5], **kw)
    assert torch.equal(out[0], expect5)
    assert [e[0] for e in g.events] == ["capture_begin", "capture_end", "replay", "update", "replay"]


def test_update_needs_auto_dispatch_capture(tnpu):
    q, k, v, kw = _fia_args()
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        tnpu.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=[2], **kw)
    with pytest.raises(RuntimeError, match="auto_dispatch_capture=True"):
        g.update([{"actual_seq_lengths_kv": [3]}])


def _capture_fia_task_group(tnpu, q, k, v, kw, lens, out, ws, event=True):
    """The documented capture side of a graph task update (torch_npu test_aclgraph_update.py)."""
    g = torch.npu.NPUGraph()
    ext = torch.npu.ExternalEvent()
    with torch.npu.graph(g):
        s = torch.npu.current_stream()
        if event:
            ext.wait(s)
            ext.reset(s)
        torch.npu.graph_task_group_begin(s)
        tnpu.npu_fused_infer_attention_score.out(q, k, v, actual_seq_lengths_kv=lens, workspace=ws, out=out, **kw)
        handle = torch.npu.graph_task_group_end(s)
    return g, handle, ext


def _update(tnpu, q, k, v, kw, lens, out, ws, handle, ext=None):
    update_stream = torch.npu.Stream()
    with torch.npu.stream(update_stream):
        torch.npu.graph_task_update_begin(update_stream, handle)
        tnpu.npu_fused_infer_attention_score.out(q, k, v, actual_seq_lengths_kv=lens, workspace=ws, out=out, **kw)
        torch.npu.graph_task_update_end(update_stream)
        if ext is not None:
            ext.record(update_stream)


def test_task_group_update_rewrites_the_captured_task(tnpu):
    q, k, v, kw = _fia_args()
    out = [torch.zeros_like(q), torch.zeros(1)]
    ws = tnpu._npu_fused_infer_attention_score_get_max_workspace(q, k, v, **kw)
    g, handle, ext = _capture_fia_task_group(tnpu, q, k, v, kw, [2], out, ws)
    assert out[0].count_nonzero() == 0, "capture computes nothing"
    _update(tnpu, q, k, v, kw, [4], out, ws, handle, ext)
    assert out[0].count_nonzero() == 0, "an update re-issues the task; it runs at the next replay"
    g.replay()
    expect, _ = tnpu.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=[4], **kw)
    assert torch.equal(out[0], expect)
    assert [e[0] for e in g.events] == ["capture_begin", "capture_end", "task_update", "replay"]
    torch.npu.graph_task_update_begin(torch.npu.Stream(), handle)
    tnpu.npu_fused_infer_attention_score.out(q, k, v, workspace=ws, out=[torch.empty_like(q), torch.empty(1)], **kw)
    with pytest.raises(RuntimeError, match="captured outputs"):
        torch.npu.graph_task_update_end(torch.npu.Stream())


def test_replay_checks_capture_update_replay_order(tnpu):
    """Every replay of a graph with task groups needs a fresh update, signalled through the
    ExternalEvent the group waits on: capture -> update -> replay, each step."""
    q, k, v, kw = _fia_args()
    out = [torch.empty_like(q), torch.empty(1)]
    ws = tnpu._npu_fused_infer_attention_score_get_max_workspace(q, k, v, **kw)
    g, handle, ext = _capture_fia_task_group(tnpu, q, k, v, kw, [2], out, ws)
    with pytest.raises(RuntimeError, match="without a sequence-length update"):
        g.replay()                                             # straight after capture
    _update(tnpu, q, k, v, kw, [3], out, ws, handle)           # updated, but the event not recorded
    with pytest.raises(RuntimeError, match="not recorded after the update"):
        g.replay()
    ext.record(torch.npu.current_stream())
    g.replay()
    with pytest.raises(RuntimeError, match="without a sequence-length update"):
        g.replay()                                             # the next step needs its own update
    for lens in ([5], [6]):
        _update(tnpu, q, k, v, kw, lens, out, ws, handle, ext)
        g.replay()
        assert torch.equal(out[0], tnpu.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=lens, **kw)[0])
    g2, handle2, _ = _capture_fia_task_group(tnpu, q, k, v, kw, [2], out, ws, event=False)
    _update(tnpu, q, k, v, kw, [3], out, ws, handle2)
    with pytest.raises(RuntimeError, match="waits on no ExternalEvent"):
        g2.replay()


def test_capture_executes_nothing(tnpu):
    """As on the device: fresh outputs are garbage (NaN / max int / True) until a replay, tensors
    that existed before the capture are not written, views are real, replay computes."""
    x, cache, idx = torch.arange(4.0), torch.zeros(3, 4), torch.tensor([2])
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        y = x * 2 + 1
        n = (x > 1).sum()
        flags = x > 1
        cache.index_copy_(0, idx, y.unsqueeze(0))
        view = cache[2]
        out = [torch.empty(4), torch.empty(1)]
    assert y.isnan().all() and n == torch.iinfo(torch.long).max and flags.all()
    assert cache.count_nonzero() == 0, "capture launches no kernel: the cache keeps its bytes"
    assert view.data_ptr() == cache[2].data_ptr()
    assert out[0].isnan().all()
    g.replay()
    assert torch.equal(y, x * 2 + 1) and n == 2 and torch.equal(flags, x > 1)
    assert torch.equal(cache[2], x * 2 + 1) and torch.equal(view, x * 2 + 1)
    with pytest.raises(RuntimeError, match="cannot be captured"):     # output shape from data
        with torch.npu.graph(torch.npu.NPUGraph()):
            x[x > 1]


def test_npu_ops_check_their_arguments_during_capture(tnpu):
    """Binding, dtypes and layouts are the host side of a launch: checked in the capture too."""
    q, k, v, kw = _fia_args()
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        with torch.npu.graph(torch.npu.NPUGraph()):
            tnpu.npu_fused_infer_attention_score(q.float(), k.float(), v.float(), **kw)
    key, value = _half(torch.randn(2, 2, 8)), _half(torch.randn(2, 2, 8))
    caches = _half(torch.zeros(2, 16, 2, 8)), _half(torch.zeros(2, 16, 2, 8))
    same = torch.tensor([3, 3], dtype=torch.int32)
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):               # slot values are device data: not checked at capture ...
        tnpu.npu_scatter_pa_kv_cache(key, value, *caches, same, cache_mode="Norm")
    with pytest.raises(ValueError, match="duplicate slots"):
        g.replay()                         # ... but when the kernel runs


@pytest.mark.parametrize("read", ["item", "int", "float", "bool", "tolist", "numpy", "synchronize"])
def test_host_sync_during_capture_raises(tnpu, read):
    x = torch.arange(3.0)
    reads = {"item": lambda: x.sum().item(), "int": lambda: int(x[0]), "float": lambda: float(x[0]),
             "bool": lambda: bool(x[0]), "tolist": lambda: x.tolist(), "numpy": lambda: x.numpy(),
             "synchronize": lambda: torch.npu.synchronize()}
    with pytest.raises(RuntimeError, match="107027"):
        with torch.npu.graph(torch.npu.NPUGraph()):
            reads[read]()
    assert x.tolist() == [0.0, 1.0, 2.0] and x.numpy().shape == (3,), "restored after the capture"


def test_capture_rules(tnpu, monkeypatch):
    g = torch.npu.NPUGraph()
    with pytest.raises(RuntimeError, match="non-default stream"):
        g.capture_begin()
    with torch.npu.graph(g):
        torch.ones(1)
    with pytest.raises(RuntimeError, match="already owns a captured graph"):
        with torch.npu.graph(g):
            pass
    with pytest.raises(RuntimeError, match="107027"):
        with torch.npu.graph(torch.npu.NPUGraph()):
            torch.npu.synchronize()
    with pytest.raises(RuntimeError, match="107027"):
        with torch.npu.graph(torch.npu.NPUGraph()):
            torch.ones(2).sum().item()
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
    with pytest.raises(RuntimeError, match="TASK_QUEUE_ENABLE"):
        with torch.npu.graph(torch.npu.NPUGraph()):
            pass
    assert not torch.npu.is_current_stream_capturing()


def test_install_is_reversible_and_labelled():
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    with fake_torch_npu.install() as fake:
        import torch_npu

        assert torch_npu is fake.module and torch_npu.__test_double__ and torch.npu is torch_npu.npu
        with pytest.raises(AttributeError, match="TEST DOUBLE"):
            torch_npu.npu_mrope  # noqa: B018 (real op, but not pinned)
        with pytest.raises(AttributeError, match="TEST DOUBLE"):
            torch.npu.set_stream  # noqa: B018
        with pytest.raises(RuntimeError, match="already installed"):
            fake_torch_npu.install()
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
