"""Logprobs: the target's own log-probabilities of each emitted token, and its top-n.

The oracle is one plain forward over the whole committed sequence (no engine, no cache
reuse, no speculation) and a log-softmax written here; it must agree for the prefill's
first token and for every token of every verify step, whatever was accepted.
"""

from __future__ import annotations

import pytest
import torch
from engine_doubles import make_target, one_thread, real_drafter  # noqa: F401

from ascend_dspark.engine.engine import Engine
from ascend_dspark.cache import PagedKVCache
from ascend_dspark.spec.sampling import SamplingParams
from ops.registry import DEVICE_DEFAULTS

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8]]


@pytest.fixture(scope="module")
def target():
    return make_target()


def reference_logprobs(target, seq: list[int]) -> torch.Tensor:
    """[len(seq), V] log p(next | prefix) from one plain float64 forward."""
    cfg = target.config
    cache = PagedKVCache.contiguous(cfg.num_layers, 1, len(seq), cfg.num_kv_heads, cfg.head_dim, torch.float64, "cpu")
    ids = torch.tensor([seq])
    with torch.inference_mode():
        out = target(ids, torch.arange(len(seq)).unsqueeze(0), cache, torch.zeros(1, dtype=torch.long),
                     torch.ones_like(ids, dtype=torch.bool))
        logits = out.hidden[0].double() @ target.lm_head.weight.double().T
    return logits - logits.logsumexp(-1, keepdim=True)


@pytest.mark.parametrize("kind", [None, "dspark", "eagle3"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_the_targets_own(target, kind, temperature):
    engine = Engine(target, real_drafter(kind, target) if kind else None, num_speculative_tokens=3,
                    max_model_len=64, max_batch_size=2)
    params = [SamplingParams(temperature=temperature, seed=4, max_tokens=9, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=temperature, seed=5, max_tokens=6, ignore_eos=True)]   # not asked
    for rid, prompt, p in zip(("a", "b"), PROMPTS, params):
        engine.add_request(rid, prompt, p, detokenize=False)
    tokens, logprobs = {"a": [], "b": []}, {"a": [], "b": []}
    while engine.has_unfinished():
        for d in engine.step():
            tokens[d.request_id] += d.new_token_ids
            if d.request_id == "b":
                assert d.logprobs is None
            else:
                assert len(d.logprobs) == len(d.new_token_ids)
                logprobs["a"] += d.logprobs
    ref = reference_logprobs(target, PROMPTS[0] + tokens["a"])
    for j, (tok, (lp, top)) in enumerate(zip(tokens["a"], logprobs["a"])):
        row = ref[len(PROMPTS[0]) - 1 + j]
        assert lp == pytest.approx(float(row[tok]), abs=1e-5)
        want = row.topk(3)
        assert [i for i, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-5)


def test_logprobs_out_of_range_are_refused():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


class ZeroFavouringTarget(torch.nn.Module):
    """TEST DOUBLE around the real target: its logits favour token 0 by ZERO_BIAS, so token
    id 0 (the one a clamp of the -1 padding could be confused with) is emitted often."""

    ZERO_BIAS = 6.0

    def __init__(self, target) -> None:
        super().__init__()
        self.inner, self.config = target, target.config

    def logits(self, hidden, registry=DEVICE_DEFAULTS):
        out = self.inner.logits(hidden, registry).clone()
        out[..., 0] += self.ZERO_BIAS
        return out

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_logprobs_of_token_zero_are_its_own(target):
    engine = Engine(ZeroFavouringTarget(target), None, max_model_len=64, max_batch_size=1)
    engine.add_request("a", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0),
                       detokenize=False)
    tokens, logprobs = [], []
    while engine.has_unfinished():
        for d in engine.step():
            tokens += d.new_token_ids
            logprobs += d.logprobs
    ref = reference_logprobs(target, PROMPTS[1] + tokens)
    ref[:, 0] += ZeroFavouringTarget.ZERO_BIAS
    ref = ref - ref.logsumexp(-1, keepdim=True)
    assert tokens[1:].count(0) >= 2                        # from verify steps, not only the prefill's
    for j, (tok, (lp, top)) in enumerate(zip(tokens, logprobs)):
        assert lp == pytest.approx(float(ref[len(PROMPTS[1]) - 1 + j, tok]), abs=1e-5) and top == []
