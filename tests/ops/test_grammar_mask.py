"""The grammar-mask op: its plain-torch reference against xgrammar's own CPU kernel."""

from __future__ import annotations

import pytest
import torch

import ops
from ops.grammar import apply_token_bitmask

xgr = pytest.importorskip("xgrammar")


@pytest.mark.parametrize("vocab", [2, 31, 32, 33, 100, 4096 + 7])
def test_reference_matches_xgrammar_cpu_kernel(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, 2, vocab, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 2, -(-vocab // 32)), dtype=torch.int32, generator=g)
    bitmask[0, 0] = -1                                    # all allowed
    bitmask[0, 1] = 0                                     # none allowed
    bitmask[1, 0, 0] = -2**31                             # only bit 31 of word 0 (the sign bit)
    want = logits.clone().view(6, vocab)
    xgr.apply_token_bitmask_inplace(want, bitmask.view(6, -1), vocab_size=vocab, backend="cpu")
    got = apply_token_bitmask(logits, bitmask)
    assert torch.equal(got.view(6, vocab), want)
    assert torch.equal(ops.apply_token_bitmask(logits, bitmask), got)
    assert torch.isfinite(logits).all()                    # the input is left alone (a new tensor)


def test_tokens_past_the_mask_are_masked_and_extra_bits_ignored():
    logits = torch.zeros(1, 40)
    narrow = torch.full((1, 1), -1, dtype=torch.int32)   # covers 32 of 40 tokens
    out = apply_token_bitmask(logits, narrow)
    assert torch.isinf(out[0, 32:]).all() and torch.isfinite(out[0, :32]).all()
    wide = torch.full((1, 3), -1, dtype=torch.int32)     # 96 bits for 40 tokens
    assert torch.equal(apply_token_bitmask(logits, wide), logits)
