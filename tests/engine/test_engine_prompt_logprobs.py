"""Prompt logprobs (SamplingParams.prompt_logprobs): the real default model with its DSpark
draft speculating, against transformers' own forward of the same weights (the oracle never
runs this engine). Small prefill chunks, so positions that predict the next chunk's first
token are checked too."""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams

pytestmark = pytest.mark.slow
TEXTS = ["Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
         "in May. How many clips did she sell altogether?\nAnswer:", "The capital of France is"]
TOP = 3


def test_prompt_logprobs_equal_the_targets_own(smollm2, smollm2_hf):
    model, tok = smollm2
    prompts = [tok.encode(t) for t in TEXTS]
    engine = Engine(model, create_drafter("dspark", model), tok, num_speculative_tokens=7, max_model_len=256,
                    max_batch_size=2, max_prefill_tokens=16, speculation="fixed")
    asked = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=TOP)
    plain = SamplingParams(temperature=0, max_tokens=4)
    outs = engine.generate(prompts, [asked, plain])
    assert outs[1].prompt_logprobs is None
    got = outs[0].prompt_logprobs
    assert len(got) == len(prompts[0]) - 1
    with torch.no_grad():
        want = torch.log_softmax(smollm2_hf(torch.tensor([prompts[0]])).logits[0].float(), dim=-1)
    for p, (lp, top) in enumerate(got):
        assert lp == pytest.approx(want[p, prompts[0][p + 1]].item(), abs=2e-3), p
        ids, vals = zip(*top)
        assert list(ids) == want[p].topk(TOP).indices.tolist(), p
        assert list(vals) == pytest.approx(want[p].topk(TOP).values.tolist(), abs=2e-3), p
    # The output is unchanged by asking for prompt logprobs.
    again = engine.generate([prompts[0]], plain)[0]
    assert again.token_ids == outs[0].token_ids
