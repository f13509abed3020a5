"""Incremental detokenization: each step's new text without re-decoding the whole output.

Decoding the full output every step costs O(n) per step, O(n^2) per request. Instead each
request keeps two offsets into its tokens (the scheme of Hugging Face's text-generation-
inference and vLLM): the text of tokens[prefix:read] was already emitted, and the new text
is decode(tokens[prefix:]) minus decode(tokens[prefix:read]). Decoding a few tokens of
context keeps tokenizer rules that depend on the neighbour (leading spaces, byte-level
merges) right, and a result ending in U+FFFD (an incomplete UTF-8 character) waits for the
next token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IncrementalText:
    prefix_offset: int = 0
    read_offset: int = 0

    def update(self, tokenizer, tokens: list[int], final: bool = False) -> str:
        """The text the tokens added since the last call ('' while a character is incomplete,
        unless `final`: then whatever is left, replacement characters included)."""
        prefix = tokenizer.decode(tokens[self.prefix_offset:self.read_offset])
        full = tokenizer.decode(tokens[self.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
            return full[len(prefix):]
        return ""
