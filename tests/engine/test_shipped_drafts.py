"""The trained drafts shipped for the default target load by kind name and really speculate.

Held-out prompts (GSM8K test, never a training prompt) through the real SmolLM2 on the CPU
at T=0: output stays identical to plain decoding, and each trained draft commits clearly
more than one token per verify step on average (a random draft commits 1.00; the
thresholds sit below the measured values in BENCHMARKS.md, which the issue's target of
tau > 2 for DSpark is not yet reached by).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ascend_dspark.drafters.shipped import DEFAULT_TARGET, DRAFTS_DIR, shipped_draft, shipped_kinds
from ascend_dspark.engine.engine import Engine
from ascend_dspark.engine.llm import build_drafter
from ascend_dspark.engine.outputs import merge_stats
from ascend_dspark.spec.sampling import SamplingParams
from ascend_dspark.training.prompts import load_prompts

pytestmark = pytest.mark.slow

KINDS = ("dspark", "dflash", "eagle3")


def test_every_kind_ships_in_bf16_and_under_16_mb():
    assert shipped_kinds() == sorted(KINDS)
    for kind in KINDS:
        path = DRAFTS_DIR / DEFAULT_TARGET / kind
        assert (path / "model.safetensors").stat().st_size < 16_000_000
        assert json.loads((path / "config.json").read_text())["drafter"] == kind
    assert shipped_draft("dspark", "some/other/model") is None


@pytest.fixture(scope="module")
def held_out(smollm2):
    _, tokenizer = smollm2
    prompts = load_prompts("gsm8k-test", 3, seed=1)
    return [tokenizer.apply_chat_template(p.messages) for p in prompts]


@pytest.mark.parametrize("kind,min_tau", [("dspark", 1.4), ("dflash", 1.4), ("eagle3", 1.3)])
def test_shipped_draft_is_exact_and_accepts(smollm2, held_out, kind, min_tau):
    target, tokenizer = smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # a shipped draft loads without the random-init warning
        drafter = build_drafter(kind, target, model="default")
    drafter = drafter.to(torch.float32).eval()
    params = SamplingParams(temperature=0.0, max_tokens=48)
    # K drafts every step: the floor is the draft's, not the confidence policy's choice of depth
    # (which on this CPU follows the measured step times).
    spec = Engine(target, drafter, tokenizer, 7, max_model_len=512, max_batch_size=3,
                  speculation="fixed").generate(held_out, params)
    plain = Engine(target, None, tokenizer, max_model_len=512, max_batch_size=3).generate(held_out, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    tau = merge_stats([o.stats for o in spec]).mean_accepted_length
    assert tau > min_tau, f"{kind}: mean accepted length {tau:.2f}"


def test_other_models_get_a_random_draft_with_a_warning(smollm2):
    target, _ = smollm2
    with pytest.warns(UserWarning, match="randomly initialised"):
        build_drafter("dspark", target, model="/some/other/checkpoint")
