"""Echo and prompt logprobs of a real default-model server (its DSpark draft speculating), as
lm-eval's log-likelihood requests send them, against the target's own log-probabilities
from transformers' forward of the same weights in this process (the oracle never runs the
engine)."""

from __future__ import annotations

import math

import openai
import pytest
import torch

pytestmark = pytest.mark.slow
TEXTS = ["Question: Janet has 3 apples and buys 5 more. How many apples does she have?\nAnswer: 8",
         "The capital of France is Paris"]


@pytest.fixture(scope="module")
def prompts(smollm2):
    _, tok = smollm2
    return [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def oracle(smollm2_hf, prompts):
    """log_softmax of transformers' logits at every position of each prompt, float32."""
    with torch.no_grad():
        return [torch.log_softmax(smollm2_hf(torch.tensor([ids])).logits[0].float(), dim=-1) for ids in prompts]


def _check_prompt_part(lp, ids, want, tokenizer_decode):
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(ids)):
        expected = want[p - 1, ids[p]].item()
        assert lp.token_logprobs[p] == pytest.approx(expected, abs=2e-3), p
        top = lp.top_logprobs[p]
        assert tokenizer_decode(ids[p]) in top and len(top) <= 2           # the top-1 plus the token itself
        assert max(top.values()) == pytest.approx(want[p - 1].max().item(), abs=2e-3), p
    assert lp.tokens[: len(ids)] == [tokenizer_decode(t) for t in ids]
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets


def test_loglikelihood_request_as_lm_eval_sends_it(default_server, prompts, oracle, smollm2):
    _, tok = smollm2
    decode = lambda t: tok.decode([t], skip_special_tokens=False)    # noqa: E731
    client = default_server.client()
    got = client.completions.create(model="smol", prompt=prompts, temperature=0, max_tokens=1, logprobs=1,
                                    echo=True, seed=1234)
    assert [c.index for c in got.choices] == [0, 1]
    for choice, ids, want in zip(got.choices, prompts, oracle):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1
        _check_prompt_part(lp, ids, want, decode)
        # The one generated token: greedy, so the argmax of the last position, with its logprob.
        assert lp.tokens[-1] == decode(want[-1].argmax().item())
        assert lp.token_logprobs[-1] == pytest.approx(want[-1].max().item(), abs=2e-3)
        assert choice.text == tok.decode(ids, skip_special_tokens=False) + lp.tokens[-1]
    assert got.usage.prompt_tokens == sum(map(len, prompts)) and got.usage.completion_tokens == 2


def test_max_tokens_0_returns_the_prompt_only(default_server, prompts, oracle, smollm2):
    _, tok = smollm2
    decode = lambda t: tok.decode([t], skip_special_tokens=False)    # noqa: E731
    client = default_server.client()
    got = client.completions.create(model="smollm2-alias", prompt=prompts[0], temperature=0, max_tokens=0,
                                    logprobs=1, echo=True)
    choice = got.choices[0]
    assert len(choice.logprobs.tokens) == len(prompts[0]) and choice.finish_reason == "length"
    _check_prompt_part(choice.logprobs, prompts[0], oracle[0], decode)
    assert choice.text == tok.decode(prompts[0], skip_special_tokens=False)
    assert got.usage.completion_tokens == 0
    # Streamed: the same text and logprobs, the prompt in the first chunk.
    chunks = list(client.completions.create(model="smol", prompt=prompts[0], temperature=0, max_tokens=0,
                                            logprobs=1, echo=True, stream=True))
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == choice.text
    assert [x for c in streamed if c.logprobs for x in c.logprobs.token_logprobs] == choice.logprobs.token_logprobs
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smol", prompt=prompts[0], max_tokens=0)
    assert err.value.body["param"] == "max_tokens"


def test_echo_changes_nothing_but_the_prefix(default_server):
    client = default_server.client()
    plain = client.completions.create(model="smol", prompt=TEXTS[1], temperature=0, max_tokens=12)
    echoed = client.completions.create(model="smol", prompt=TEXTS[1], temperature=0, max_tokens=12, echo=True)
    assert echoed.choices[0].text == TEXTS[1] + plain.choices[0].text and echoed.choices[0].logprobs is None
    assert echoed.speculation["num_draft_tokens"] > 0          # the draft speculated
    streamed = client.completions.create(model="smol", prompt=TEXTS[1], temperature=0, max_tokens=12, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text
    # Generated-token logprobs after an echoed prompt: the prompt's positions, then the output's.
    both = client.completions.create(model="smol", prompt=TEXTS[1], temperature=0, max_tokens=6, echo=True,
                                     logprobs=0)
    alone = client.completions.create(model="smol", prompt=TEXTS[1], temperature=0, max_tokens=6, logprobs=0)
    n = len(alone.choices[0].logprobs.tokens)
    assert both.choices[0].logprobs.tokens[-n:] == alone.choices[0].logprobs.tokens
    assert both.choices[0].logprobs.token_logprobs[-n:] == pytest.approx(alone.choices[0].logprobs.token_logprobs,
                                                                         abs=1e-4)
    assert all(math.isfinite(v) for v in both.choices[0].logprobs.token_logprobs[1:])
    default_server.wait_idle()
