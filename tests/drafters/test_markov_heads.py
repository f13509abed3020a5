"""DSpark Markov head variants (vanilla, gated, RNN) in the drafter: config, DeepSpec names,
what propose computes (against a plain-torch oracle on the state dict), losslessness, the
RNN state across the block, and the teacher-forced training API `sequential_terms`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from drafter_helpers import SoftmaxSampling, greedy, make_target, random_features, scramble
from test_drafters_deepspec import write_deepspec

from ascend_dspark.drafters import DrafterConfig, create_drafter, load_deepspec_drafter, load_drafter, save_drafter

HEADS = ["vanilla", "gated", "rnn"]
RANK = 12


def dspark(target, head="vanilla", seed=11, **overrides):
    overrides = {"markov_rank": RANK, "markov_head_type": head, **overrides}
    drafter = scramble(create_drafter("dspark", target, **overrides), seed=seed)
    drafter.allocate(2, 48)
    return drafter


def observed(drafter, length=6, seed=1):
    feats = random_features(drafter, 1, length, seed=seed)
    drafter.observe(torch.tensor([0]), feats, torch.arange(length).unsqueeze(0),
                    torch.zeros(1, length, dtype=torch.long), torch.tensor([length]))
    return torch.tensor([0]), torch.tensor([4]), torch.tensor([length])     # slot, anchor, anchor position


def oracle_chain(sd, head, h, base, prev_tokens, with_markov=True):
    """Plain torch from the state dict, one request: (logits [K, V], confidence [K]) given the
    previous tokens [K] (anchor first). Written from paper Eq. 4-7 / DeepSpec markov_head.py."""
    p = "markov_head."
    w1, w2 = sd[p + "markov_w1.weight"], sd[p + "markov_w2.weight"]
    s = torch.zeros(w1.shape[1], dtype=h.dtype)
    logits, conf = [], []
    for k in range(h.shape[0]):
        e = w1[prev_tokens[k]]
        if head == "vanilla":
            u = e
        elif head == "gated":
            u = torch.sigmoid(sd[p + "gate_proj.weight"] @ torch.cat([h[k], e]) + sd[p + "gate_proj.bias"]) * e
        else:
            r = e.shape[0]
            pre = sd[p + "joint_proj.weight"] @ torch.cat([s, e, h[k]]) + sd[p + "joint_proj.bias"]
            g = torch.sigmoid(pre[:r])
            u = torch.tanh(pre[2 * r:])                       # from z_k, i.e. from s_{k-1}
            s = g * s + (1 - g) * torch.tanh(pre[r:2 * r])
        logits.append(base[k].double() + (w2 @ u).double())
        feat = torch.cat([h[k], e]) if with_markov else h[k]
        conf.append(torch.sigmoid(sd["confidence_head.proj.weight"][0] @ feat + sd["confidence_head.proj.bias"][0]))
    return torch.stack(logits), torch.stack(conf)


# ------------------------------------------------------------------------------------------ config
def test_config_normalises_and_validates():
    base = dict(kind="dspark", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=8, vocab_size=96, target_layer_ids=[1], block_size=4, markov_rank=8)
    assert DrafterConfig(**base).markov_head_type == "vanilla"
    assert DrafterConfig(**base, markov_head_type="RNN").markov_head_type == "rnn"
    assert DrafterConfig(**base, markov_head_type="Gated").markov_head_type == "gated"
    with pytest.raises(ValueError, match="unknown markov_head_type 'lstm'"):
        DrafterConfig(**base, markov_head_type="lstm")
    with pytest.raises(ValueError, match="needs a Markov head"):
        DrafterConfig(**{**base, "markov_rank": 0}, markov_head_type="rnn")
    old = {k: v for k, v in DrafterConfig(**base).to_dict().items() if k != "markov_head_type"}
    assert DrafterConfig.from_dict(old).markov_head_type == "vanilla"        # configs written before the field


def test_old_own_format_checkpoint_loads_as_vanilla(tmp_path, target):
    drafter = dspark(target)
    save_drafter(drafter, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw.pop("markov_head_type") == "vanilla"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_drafter(tmp_path, target).config == drafter.config


@pytest.mark.parametrize("head", HEADS)
def test_parameter_names_are_deepspecs(head, target):
    h, v = target.config.hidden_size, target.config.vocab_size
    shapes = {k: tuple(t.shape) for k, t in dspark(target, head).state_dict().items() if "_head." in k}
    expected = {"markov_head.markov_w1.weight": (v, RANK), "markov_head.markov_w2.weight": (v, RANK),
                "confidence_head.proj.weight": (1, h + RANK), "confidence_head.proj.bias": (1,)}
    if head == "gated":
        expected.update({"markov_head.gate_proj.weight": (RANK, h + RANK), "markov_head.gate_proj.bias": (RANK,)})
    if head == "rnn":
        expected.update({"markov_head.joint_proj.weight": (3 * RANK, 2 * RANK + h),
                         "markov_head.joint_proj.bias": (3 * RANK,)})
    assert shapes == expected


# ------------------------------------------------------------------------------------------ propose
@pytest.mark.parametrize("head", HEADS)
def test_propose_matches_oracle(head, target):
    drafter = dspark(target, head)
    slot, anchor, pos = observed(drafter)
    sd = drafter.state_dict()
    h = drafter.draft_hidden(drafter.block_hidden(slot, anchor, pos), 7)[0]
    base = drafter.logits(h)
    # Greedy: each draft is the argmax of the oracle's logits given the drafts before it.
    prop = drafter.propose(slot, anchor, pos, 7, greedy(1))
    prev = torch.cat([anchor, prop.tokens[0, :-1]])
    logits, conf = oracle_chain(sd, head, h, base, prev)
    assert prop.tokens[0].tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(prop.confidence[0].double(), conf, rtol=1e-5, atol=1e-6)
    # Sampled (T = 1): the returned q_k is the distribution x_k was drawn from, for the chain drawn.
    prop = drafter.propose(slot, anchor, pos, 7, SoftmaxSampling(1, seed=5))
    prev = torch.cat([anchor, prop.tokens[0, :-1]])
    logits, conf = oracle_chain(sd, head, h, base, prev)
    torch.testing.assert_close(prop.probs[0].double(), torch.softmax(logits, -1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(prop.confidence[0].double(), conf, rtol=1e-5, atol=1e-6)


def test_rnn_state_carries_the_whole_prefix(target):
    """First-order heads forget x_{k-2}; the RNN's bias at k depends on every earlier draft."""
    changed = {}
    for head in HEADS:
        drafter = dspark(target, head)
        slot, anchor, pos = observed(drafter)
        a = drafter.propose(slot, anchor, pos, 4, SoftmaxSampling(1, forced=[torch.tensor([t]) for t in (10, 20, 30)]))
        b = drafter.propose(slot, anchor, pos, 4, SoftmaxSampling(1, forced=[torch.tensor([t]) for t in (11, 20, 30)]))
        assert torch.equal(a.probs[:, 0], b.probs[:, 0])                     # slot 0 only sees the anchor
        assert (a.probs[:, 1] - b.probs[:, 1]).abs().max() > 1e-6            # slot 1 follows draft 0
        assert a.confidence[0, 2] == b.confidence[0, 2]                      # confidence: W1[x_{k-1}] only
        changed[head] = bool((a.probs[:, 2:] - b.probs[:, 2:]).abs().max() > 1e-6)
    assert changed == {"vanilla": False, "gated": False, "rnn": True}


def test_gated_head_uses_hidden_state(target):
    """The gate reads h_k, so the gated bias differs from the vanilla one with the same W1, W2."""
    gated = dspark(target, "gated")
    vanilla = dspark(target, "vanilla")
    vanilla.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("markov_head.gate_proj")})
    for d in (gated, vanilla):
        observed(d)
    args = (torch.tensor([0]), torch.tensor([4]), torch.tensor([6]), 3)
    forced = [torch.tensor([t]) for t in (10, 20, 30)]
    a = gated.propose(*args, SoftmaxSampling(1, forced=list(forced)))
    b = vanilla.propose(*args, SoftmaxSampling(1, forced=list(forced)))
    assert (a.probs - b.probs).abs().max() > 1e-6 and torch.equal(a.confidence, b.confidence)


# --------------------------------------------------------------------------------- sequential_terms
CASES = [dict(markov_head_type=h) for h in HEADS] + [
    dict(markov_head_type="rnn", confidence_head_with_markov=False),
    dict(markov_rank=0, markov_head_type="vanilla"),                        # confidence head only
    dict(markov_head_type="gated", confidence_head=False),                 # Markov head only
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sequential_terms_reproduce_propose_exactly(case):
    target = make_target(torch.float32)
    drafter = dspark(target, **case)
    k = drafter.max_draft_tokens
    slots, anchors, pos = torch.tensor([0, 1]), torch.tensor([4, 9]), torch.tensor([6, 6])
    feats = random_features(drafter, 2, 6)
    drafter.observe(slots, feats, torch.arange(6).expand(2, 6), torch.zeros(2, 6, dtype=torch.long),
                    torch.tensor([6, 6]))
    prop = drafter.propose(slots, anchors, pos, k, SoftmaxSampling(2, seed=3))
    h = drafter.draft_hidden(drafter.block_hidden(slots, anchors, pos), k)
    prev = torch.cat([anchors.unsqueeze(1), prop.tokens[:, :-1]], 1)
    bias, conf_logit = drafter.sequential_terms(h, prev)
    logits = drafter.logits(h)
    if drafter.config.markov_rank:
        assert bias.shape == logits.shape and bias.dtype == torch.float32
        logits = logits + bias
    else:
        assert bias is None
    assert torch.equal(torch.softmax(logits, -1), prop.probs)
    if drafter.config.confidence_head:
        assert conf_logit.shape == (2, k) and conf_logit.dtype == torch.float32
        assert torch.equal(torch.sigmoid(conf_logit), prop.confidence)
    else:
        assert conf_logit is None and prop.confidence is None


def test_sequential_terms_without_heads_and_bad_shapes(target):
    drafter = dspark(target, markov_rank=0, confidence_head=False)
    h = torch.zeros(3, 5, target.config.hidden_size, dtype=torch.float64)
    assert drafter.sequential_terms(h, torch.zeros(3, 5, dtype=torch.long)) == (None, None)
    with pytest.raises(ValueError, match=r"\[N, K >= 1, H\]"):
        dspark(target).sequential_terms(h, torch.zeros(3, 4, dtype=torch.long))


@pytest.mark.parametrize("head", HEADS)
def test_sequential_terms_are_differentiable(head, target):
    """Teacher forced and trainable: gradients reach every head weight and the backbone hidden."""
    drafter = dspark(target, head)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, target.config.hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    prev = torch.randint(0, target.config.vocab_size, (3, 5), generator=gen)
    bias, conf = drafter.sequential_terms(h, prev)
    labels = torch.randint(0, target.config.vocab_size, (3, 5), generator=gen)
    loss = F.cross_entropy((drafter.logits(h) + bias).flatten(0, 1), labels.flatten()) + conf.square().mean()
    loss.backward()
    for name, p in drafter.named_parameters():
        if name.startswith(("markov_head.", "confidence_head.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert h.grad.abs().sum() > 0
    # RNN: the bias at slot k depends on the teacher-forced tokens of every earlier slot.
    prev2 = prev.clone()
    prev2[:, 1] = (prev2[:, 1] + 1) % target.config.vocab_size
    with torch.no_grad():
        b1, b2 = drafter.sequential_terms(h, prev)[0], drafter.sequential_terms(h, prev2)[0]
    assert torch.equal(b1[:, :1], b2[:, :1]) and not torch.equal(b1[:, 1], b2[:, 1])
    assert torch.equal(b1[:, 2:], b2[:, 2:]) == (head != "rnn")


# ------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("head", ["gated", "rnn"])
def test_own_format_round_trip(head, tmp_path, target):
    drafter = dspark(target, head)
    save_drafter(drafter, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["markov_head_type"] == head
    loaded = load_drafter(tmp_path, target)
    assert loaded.config == drafter.config
    loaded.allocate(2, 48)
    args = observed(drafter) + (7,)
    observed(loaded)
    a, b = drafter.propose(*args, SoftmaxSampling(1)), loaded.propose(*args, SoftmaxSampling(1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs) and torch.equal(a.confidence, b.confidence)


@pytest.mark.parametrize("head", ["gated", "rnn", "Gated", "RNN"])
def test_deepspec_export_with_head_type_loads(head, tmp_path, target):
    """A DeepSpec file with the gated / RNN tensors loads by name (type compared case-insensitively)."""
    h, r = target.config.hidden_size, 16
    gen = torch.Generator().manual_seed(8)
    extra = ({"markov_head.gate_proj.weight": torch.randn(r, h + r, generator=gen, dtype=torch.float64) * 0.2,
              "markov_head.gate_proj.bias": torch.randn(r, generator=gen, dtype=torch.float64) * 0.2}
             if head.lower() == "gated" else
             {"markov_head.joint_proj.weight": torch.randn(3 * r, 2 * r + h, generator=gen, dtype=torch.float64) * 0.2,
              "markov_head.joint_proj.bias": torch.randn(3 * r, generator=gen, dtype=torch.float64) * 0.2})
    sd = write_deepspec(tmp_path, target, rank=r, extra=extra, config_overrides={"markov_head_type": head})
    drafter = load_deepspec_drafter(tmp_path, target)
    assert drafter.config.markov_head_type == head.lower()
    for name, value in extra.items():
        assert torch.equal(drafter.state_dict()[name], value)
    drafter.allocate(1, 32)
    slot, anchor, pos = observed(drafter)
    hid = drafter.draft_hidden(drafter.block_hidden(slot, anchor, pos), 5)[0]
    prop = drafter.propose(slot, anchor, pos, 5, greedy(1))
    prev = torch.cat([anchor, prop.tokens[0, :-1]])
    logits, conf = oracle_chain(sd, head.lower(), hid, hid @ sd["lm_head.weight"].T, prev)
    assert prop.tokens[0].tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(prop.confidence[0].double(), conf, rtol=1e-5, atol=1e-6)


def test_deepspec_file_missing_the_head_tensors(tmp_path, target):
    write_deepspec(tmp_path, target, config_overrides={"markov_head_type": "rnn"})
    with pytest.raises(ValueError, match=r"missing tensor.*markov_head\.joint_proj\.bias"):
        load_deepspec_drafter(tmp_path, target)
