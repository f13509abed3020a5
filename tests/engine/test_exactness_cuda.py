"""Half precision on the GPU: speculation is token-identical to plain greedy decoding.

The real default model in bf16 and fp16 (the dtypes people run on a GPU), 32 held-out GSM8K
test prompts x 256 tokens (EOS ignored, so every position counts), every shipped draft at
K = 1..7, batch 16; and batch 1 equals batch 16. The oracle is plain decoding: a 1-row
forward per step. Before the batch-invariant matmul, bf16 speculation diverged from it on
5 of 8 prompts (BENCHMARKS.md, "bf16 exactness"); the CPU suite checks the same in float32
(tests/engine/test_smollm2_engine.py, test_shipped_drafts.py).
"""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.engine.engine import Engine
from ascend_dspark.engine.llm import build_drafter
from ascend_dspark.models import load_target
from ascend_dspark.spec.sampling import SamplingParams
from ascend_dspark.training.prompts import load_prompts

pytestmark = [pytest.mark.slow, pytest.mark.cuda]

NUM_PROMPTS, NUM_TOKENS, BATCH = 32, 256, 16
PARAMS = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def half_target(request, smollm2_cache):
    model, tokenizer = load_target("default", request.param, "cuda")
    prompts = [tokenizer.apply_chat_template(p.messages) for p in load_prompts("gsm8k-test", NUM_PROMPTS, seed=2)]
    plain = _generate(model, None, tokenizer, prompts, BATCH)
    return model, tokenizer, prompts, plain


def _generate(model, drafter, tokenizer, prompts, batch, k=7) -> list[list[int]]:
    engine = Engine(model, drafter, tokenizer, k, max_model_len=640, max_batch_size=batch)
    return [o.token_ids for o in engine.generate(prompts, PARAMS)]


def _divergences(got: list[list[int]], want: list[list[int]]) -> list[tuple[int, int]]:
    """(prompt, first differing position) for every prompt whose tokens differ."""
    out = []
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            out.append((i, next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))))
    return out


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_speculation_is_token_identical_for_every_k(half_target, kind):
    model, tokenizer, prompts, plain = half_target
    assert all(len(t) == NUM_TOKENS for t in plain)
    drafter = build_drafter(kind, model, model="default").to(model.lm_head.weight.dtype)
    failures = {}
    for k in range(1, 8):
        diverged = _divergences(_generate(model, drafter, tokenizer, prompts, BATCH, k), plain)
        if diverged:
            failures[k] = diverged
    assert not failures, f"{kind}: K -> [(prompt, first differing token)]: {failures}"


def test_batch_1_equals_batch_16(half_target):
    model, tokenizer, prompts, plain = half_target
    assert not _divergences(_generate(model, None, tokenizer, prompts, 1), plain)
    drafter = build_drafter("dspark", model, model="default").to(model.lm_head.weight.dtype)
    assert not _divergences(_generate(model, drafter, tokenizer, prompts, 1), plain)
