"""Grammar masks: a token bitmask applied to logits (structured output).

The bitmask is the layout xgrammar and llguidance share: int32 [..., ceil(V / 32)], bit
`i % 32` of word `i // 32` set when token i is allowed. Masked tokens get -inf logits, so
they have probability 0 under every later transform (temperature, top-k, top-p, min-p).
Which rows of a step are masked, and with which grammar state, is
`ascend_dspark.spec.grammar`'s business; this op only does the maths, on the device.

The reference unpacks the words with a bitwise AND against the 32 one-bit words (no shift:
int shifts are acl_op-only on some torch_npu releases, tests/platform/torch_npu_contracts/),
which is xgrammar's own torch-native path in spirit and agrees with its CPU kernel
(tests/ops/test_grammar_mask.py). Tokens past the mask's width (a vocabulary padded beyond
the tokenizer's) are masked.
"""

from __future__ import annotations

import torch

from .registry import dispatching

BITS = 32


def _bit_words(device: torch.device) -> torch.Tensor:
    """The 32 one-bit int32 words: 1, 2, 4, ..., -2**31 (bit 31 as a signed int32)."""
    return torch.tensor([(1 << i) - (1 << 32 if i == 31 else 0) for i in range(BITS)], dtype=torch.int32,
                        device=device)


@dispatching("token_bitmask")
def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [..., V] with every token whose bit is 0 set to -inf (a new tensor).

    bitmask int32 [..., W] with the leading dims of `logits`; W * 32 may be below V (the
    tokens past it are masked) or above it (the extra bits are ignored)."""
    vocab = logits.shape[-1]
    allowed = (bitmask.unsqueeze(-1) & _bit_words(bitmask.device)) != 0              # [..., W, 32]
    allowed = allowed.flatten(-2)[..., :vocab]
    if allowed.shape[-1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[-1]), value=False)
    return logits.masked_fill(~allowed, float("-inf"))
