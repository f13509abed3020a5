"""The real default model through the engine: every drafter is token-identical to plain
greedy decoding (and to transformers), on the CPU and, when present, on CUDA."""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import hf_greedy

pytestmark = pytest.mark.slow
CHATS = [[{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
         [{"role": "user", "content": "What is 12 * 7? Answer briefly."}]]


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def smol_on_device(request, smollm2):
    model, tok = smollm2
    return model.to(request.param), tok


def test_every_drafter_matches_plain_greedy(smol_on_device, smollm2_hf):
    model, tok = smol_on_device
    prompts = [tok.apply_chat_template(c) for c in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    plain = Engine(model, None, tok, max_model_len=256, max_batch_size=2).generate(prompts, params)
    assert plain[0].token_ids == hf_greedy(smollm2_hf, prompts[0], 32)[: len(plain[0].token_ids)]
    for kind in ("eagle3", "dflash", "dspark"):
        engine = Engine(model, create_drafter(kind, model), tok, num_speculative_tokens=7,
                        max_model_len=256, max_batch_size=2)
        outs = engine.generate(prompts, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain], kind
        assert all(o.stats.num_steps > 0 for o in outs)
