"""Incremental detokenization gives exactly the full decode, a character at a time.

A byte-level BPE tokenizer (trained here on text with accents, CJK and emoji, so that one
character spans several tokens) decodes random token streams; the deltas, taken after
every token, must concatenate to the one-shot decode, and no delta may carry a U+FFFD for
a character whose bytes are still arriving. The engine's stop strings then cut the
streamed text exactly where the one-shot text would be cut.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ascend_dspark.engine.detokenizer import IncrementalText
from ascend_dspark.models.tokenizer import Tokenizer

CORPUS = ["Grüße aus Köln! 你好，世界。", "emoji 🙂🚀 mixed with text", "naïve café — déjà vu", "plain ascii words"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw))


def test_deltas_concatenate_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    for text in CORPUS[:4] + ["🙂" * 5 + "end"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        stream = IncrementalText()
        deltas = [stream.update(tokenizer, ids[:i + 1]) for i in range(len(ids))]
        assert "".join(deltas) == tokenizer.decode(ids) == text
        assert all("\ufffd" not in d for d in deltas)
        assert any(d == "" for d in deltas) or text.isascii()        # a character waited for its bytes
    random_ids = [rng.randrange(tokenizer.vocab_size) for _ in range(200)]
    stream = IncrementalText()
    got = "".join(stream.update(tokenizer, random_ids[:i + 1], final=i == len(random_ids) - 1)
                  for i in range(len(random_ids)))
    assert got == tokenizer.decode(random_ids)                       # garbage bytes too, at the end
