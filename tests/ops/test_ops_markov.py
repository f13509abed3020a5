"""ops.markov.markov_head_step (vanilla, gated, RNN Markov heads + confidence logit) against a
per-row float64 oracle written from the formulas (paper Eq. 5-7, DeepSpec markov_head.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ops.markov import markov_confidence_step, markov_head_step

B, V, R, H = 4, 40, 6, 10


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def oracle_row(kind, prev, h, s, w):
    """(bias [V], confidence logit, new state or None) for one row, float64, loops written out."""
    e = w["w1"][prev].double()
    h = h.double()
    new_state = None
    if kind == "vanilla":
        u = e
    elif kind == "gated":
        x = torch.cat([h, e])
        u = torch.tensor([_sig(float(w["gw"][i].double() @ x) + float(w["gb"][i])) for i in range(R)],
                         dtype=torch.float64) * e
    else:
        s = torch.zeros(R, dtype=torch.float64) if s is None else s.double()
        z = torch.cat([s, e, h])
        pre = [float(w["jw"][i].double() @ z) + float(w["jb"][i]) for i in range(3 * R)]
        g = torch.tensor([_sig(p) for p in pre[:R]], dtype=torch.float64)
        c = torch.tensor([math.tanh(p) for p in pre[R:2 * R]], dtype=torch.float64)
        u = torch.tensor([math.tanh(p) for p in pre[2 * R:]], dtype=torch.float64)
        new_state = g * s + (1 - g) * c
    bias = torch.stack([w["w2"][v].double() @ u for v in range(V)])
    conf = float(w["cw"][0].double() @ torch.cat([h, e])) + float(w["cb"][0])
    return bias, conf, new_state


def weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = dict(w1=(V, R), w2=(V, R), gw=(R, H + R), gb=(R,), jw=(3 * R, 2 * R + H), jb=(3 * R,), cw=(1, H + R), cb=(1,))
    return {k: (torch.randn(shape, generator=g) * 0.7).to(dtype) for k, shape in raw.items()}


def op_kwargs(kind, w):
    kw = dict(markov_w1=w["w1"], markov_w2=w["w2"], conf_weight=w["cw"], conf_bias=w["cb"])
    if kind == "gated":
        kw.update(gate_weight=w["gw"], gate_bias=w["gb"])
    if kind == "rnn":
        kw.update(joint_weight=w["jw"], joint_bias=w["jb"])
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_three_steps_match_oracle(kind, dtype):
    w = weights(dtype)
    g = torch.Generator().manual_seed(5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=8e-2)
    prev = torch.tensor([0, 39, 7, 7])
    state, ref_states = None, [None] * B
    for step in range(3):
        base = torch.randn(B, V, generator=g)
        hidden = torch.randn(B, H, generator=g).to(dtype)
        logits, conf, new_state = markov_head_step(prev, hidden, base, state, **op_kwargs(kind, w))
        assert logits.dtype == torch.float32 and conf.dtype == torch.float32 and conf.shape == (B,)
        assert (new_state is None) == (kind != "rnn")
        for i in range(B):
            bias, c, s = oracle_row(kind, int(prev[i]), hidden[i], ref_states[i], w)
            torch.testing.assert_close(logits[i].double(), base[i].double() + bias, **tol)
            assert math.isclose(conf[i].item(), c, rel_tol=tol["rtol"] * 10, abs_tol=tol["atol"] * 10)
            if kind == "rnn":
                torch.testing.assert_close(new_state[i].double(), s, **tol)
                ref_states[i] = new_state[i]          # continue from the op's state: errors do not compound
        state = new_state
        prev = torch.randint(0, V, (B,), generator=g)


def test_bias_alone_and_zero_initial_state():
    w = weights(torch.float32)
    g = torch.Generator().manual_seed(1)
    prev, hidden, base = torch.tensor([1, 2, 3, 4]), torch.randn(B, H, generator=g), torch.randn(B, V, generator=g)
    for kind in ("vanilla", "gated", "rnn"):
        logits, conf, state = markov_head_step(prev, hidden, base, None, **op_kwargs(kind, w))
        bias, conf2, state2 = markov_head_step(prev, hidden, None, None, **op_kwargs(kind, w))
        assert torch.equal(base + bias, logits) and torch.equal(conf, conf2)
        if kind == "rnn":
            zero = markov_head_step(prev, hidden, base, torch.zeros(B, R), **op_kwargs(kind, w))
            assert torch.equal(zero[0], logits) and torch.equal(zero[2], state) and torch.equal(state2, state)


def test_no_heads_and_confidence_options():
    w = weights(torch.float32)
    g = torch.Generator().manual_seed(2)
    prev, hidden, base = torch.tensor([1, 2, 3, 4]), torch.randn(B, H, generator=g), torch.randn(B, V, generator=g)
    assert markov_head_step(prev, hidden, None) == (None, None, None)
    logits, conf, state = markov_head_step(prev, hidden, base)
    assert torch.equal(logits, base) and conf is None and state is None
    _, conf_h, _ = markov_head_step(prev, hidden, base, conf_weight=w["cw"][:, :H], conf_bias=w["cb"])
    torch.testing.assert_close(conf_h.double(), hidden.double() @ w["cw"][0, :H].double() + w["cb"].double(),
                               rtol=1e-5, atol=1e-5)
    # With a Markov head but conf_with_markov=False the head still sees h alone.
    kw = {**op_kwargs("rnn", w), "conf_weight": w["cw"][:, :H], "conf_with_markov": False}
    assert torch.equal(markov_head_step(prev, hidden, base, **kw)[1], conf_h)
    # The vanilla probability entry point is sigmoid of the logit.
    _, p = markov_confidence_step(base, prev, hidden, w["w1"], w["w2"], w["cw"], w["cb"])
    _, z, _ = markov_head_step(prev, hidden, base, **op_kwargs("vanilla", w))
    assert torch.equal(p, torch.sigmoid(z))


def test_gated_and_rnn_together_refused():
    w = weights(torch.float32)
    kw = {**op_kwargs("gated", w), "joint_weight": w["jw"], "joint_bias": w["jb"]}
    with pytest.raises(ValueError, match="not both"):
        markov_head_step(torch.tensor([0]), torch.zeros(1, H), None, **kw)


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_differentiable(kind):
    """Training unrolls this op: gradients w.r.t. every weight, the hidden state and the RNN state."""
    w = {k: v.double().requires_grad_() for k, v in weights(torch.float32).items()}
    g = torch.Generator().manual_seed(3)
    prev = torch.tensor([1, 5])
    hidden = torch.randn(2, H, generator=g, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, R, generator=g, dtype=torch.float64, requires_grad=True)
    kw = op_kwargs(kind, w)
    names = sorted(k for k, v in kw.items() if isinstance(v, torch.Tensor))

    def f(hidden, state, *params):
        out = markov_head_step(prev, hidden, None, state, **{**kw, **dict(zip(names, params))})
        return tuple(t for t in out if t is not None)

    inputs = (hidden, state, *[kw[n] for n in names])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-3, atol=5e-3, rtol=1e-2)      # loose: outputs are float32
