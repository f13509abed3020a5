"""Thin wrapper over a transformers tokenizer: token ids in, token ids out.

The engine only needs ids, a chat template and the set of stop tokens; this keeps the
transformers return-type zoo (lists, BatchEncoding, tensors) out of everything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


class Tokenizer:
    def __init__(self, hf_tokenizer, eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf_tokenizer
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        # Stop on any of them: instruct models often end turns with a token (<|im_end|>,
        # <|eot_id|>, <end_of_turn>) that only the config or only the tokenizer names.
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(ids))

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), eos_token_ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included).

        May be smaller than the model's `config.vocab_size` (embedding rows are often padded).
        """
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain-text prompt -> ids (BOS added where the model's tokenizer adds one)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages -> prompt ids ending with the assistant-turn header."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; encode a plain prompt instead")
        out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys"):                 # BatchEncoding / dict (transformers 5 default)
            out = out["input_ids"]
        if hasattr(out, "tolist"):               # tensor / array
            out = out.tolist()
        if out and isinstance(out[0], list):     # a batch of one
            (out,) = out
        return [int(i) for i in out]
