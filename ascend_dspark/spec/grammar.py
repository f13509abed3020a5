"""Structured output under speculation: grammar masks that keep verification lossless.

A request with a grammar (a JSON schema, any JSON object, a choice of strings) samples from
the *masked* target distribution: at every position the tokens the grammar forbids after
the committed text get probability 0 and the rest are renormalised (masked before
temperature / top-k / top-p / min-p, so they apply to the allowed tokens only). That is the
law of plain constrained decoding; speculation must reproduce it exactly.

Why the rule here is lossless (option (b) of shared/reference/structured-output.md §3):

- The drafts keep their raw distribution q: the drafter samples as it always does, and
  verification checks each draft against the very q it was drawn from, as the speculative
  sampling identity requires (spec/verify.py).
- The target's row i (the distribution of the token after the committed prefix and drafts
  d1..di) is masked with the grammar state after exactly that prefix: p'_i = norm(p_i * mask_i).
  Rows are built per step by accept / fill / rollback on the request's matcher
  (`RequestGrammar.step_rows`), for whatever verify depth the step chose.
- Verification then runs unchanged on p' and q: d_i is accepted with probability
  min(1, p'_i(d)/q_i(d)), a rejection samples norm(max(p'_i - q_i, 0)), an all-accepted chain
  samples the bonus from p'. By the identity in spec/verify.py every committed token is
  distributed as p'_i given the committed prefix: masked plain decoding, token for token.
- A draft the grammar forbids has p'(d) = 0, so it is rejected with certainty and the
  residual at that position is norm(max(p' - q, 0)) with its real q: the position is
  *verified*, never truncated. (Truncating at the invalid draft and sampling p' there, or
  sampling drafts from the masked q' but verifying with raw q, are both biased: the
  reference measures total-variation errors of 0.21 and 0.73; tests/engine/test_structured_output.py
  shows the chi-square test catching the first.) Rows past an invalid draft are never
  reached, and are left all-allowed.
- The matcher itself only ever advances by committed tokens (`commit`), after verification;
  the row building rolls back everything it accepted. A committed token the grammar
  refuses (impossible by construction) aborts that request with an error, never the engine.

Greedy rows (T = 0) accept while the draft is the argmax of the masked logits and emit that
argmax, which is exactly plain constrained greedy decoding.

The other exact option, sampling drafts from the masked q' and verifying with q', would need
the grammar state between draft positions inside the drafter's proposal (a host round trip
per draft token inside a step graph); verifying with raw q needs the drafts on the host only
once per step, after the proposal.

Library: xgrammar (PyPI `xgrammar`, the `structured` extra): grammars are compiled once per
request by `GrammarCompiler` off the engine loop (the server compiles in a worker thread),
and each request gets its own `xgrammar.GrammarMatcher`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

BITS = 32


class GrammarError(ValueError):
    """A format that cannot be compiled (bad JSON schema, unsupported keyword): the message is
    for the user."""


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled grammar, ready for any number of requests (each gets its own matcher)."""

    compiled: object          # xgrammar.CompiledGrammar
    vocab_size: int           # bitmask width in tokens (the target's vocabulary)
    description: str          # what it constrains to, for logs and errors


def bitmask_width(vocab_size: int) -> int:
    return -(-vocab_size // BITS)


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:                          # the `structured` extra is not installed
        raise GrammarError("structured output needs the xgrammar package: pip install 'ascend-dspark[structured]'") \
            from exc
    return xgrammar


class GrammarCompiler:
    """Compiles formats for one vocabulary (xgrammar's compiler caches them).

    `tokenizer_info`: xgrammar's view of the vocabulary (each token's bytes and the stop
    tokens, which the grammar allows exactly where the output is complete); `vocab_size`: the
    target's logits width. `for_tokenizer` builds one from a transformers tokenizer: that
    reads the whole vocabulary (a fraction of a second), so build it once, off the engine loop."""

    def __init__(self, tokenizer_info, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._compiler = _xgrammar().GrammarCompiler(tokenizer_info)

    @classmethod
    def for_tokenizer(cls, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarCompiler:
        """`stop_token_ids`: the tokens that end a generation (the engine's EOS ids)."""
        info = _xgrammar().TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                          stop_token_ids=list(stop_token_ids))
        return cls(info, vocab_size)

    def json_schema(self, schema: dict | str) -> CompiledGrammar:
        """Output that is one JSON value valid under `schema` (compact separators)."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            json.loads(text)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        return self._compile(lambda: self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True),
                             f"JSON schema {text[:80]}")

    def json_object(self) -> CompiledGrammar:
        """Output that is any JSON object (OpenAI's `json_object`: vLLM maps it the same way)."""
        return self.json_schema({"type": "object"})

    def choice(self, choices: list[str]) -> CompiledGrammar:
        """Output that is exactly one of `choices` (vLLM's `guided_choice`)."""
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise GrammarError("a choice needs a non-empty list of non-empty strings")
        ebnf = "root ::= " + " | ".join(json.dumps(c) for c in choices)
        return self._compile(lambda: self._compiler.compile_grammar(ebnf), f"choice of {len(choices)} strings")

    def _compile(self, build, description: str) -> CompiledGrammar:
        try:
            compiled = build()
        except (RuntimeError, ValueError, TypeError) as exc:          # xgrammar's C++ errors arrive as RuntimeError
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise GrammarError(f"the format cannot be compiled: {message}") from None
        return CompiledGrammar(compiled, self.vocab_size, description)


class RequestGrammar:
    """One request's grammar state: an xgrammar matcher that has accepted exactly the
    request's committed output."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        xgr = _xgrammar()
        self.grammar = grammar
        self._matcher = xgr.GrammarMatcher(grammar.compiled)
        self.width = bitmask_width(grammar.vocab_size)

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()

    def step_rows(self, drafts: list[int], out: torch.Tensor) -> None:
        """Fill `out` (int32 [len(drafts) + 1, W], all-allowed on entry) with the masks of the
        step's rows: row i is the grammar state after the committed output and drafts[:i].
        Stops at the first draft the grammar refuses (verification rejects it for certain,
        so no later row is read) or at termination (the request ends there). The matcher
        is rolled back to the committed state."""
        m = self._matcher
        accepted = 0
        try:
            for i in range(len(drafts) + 1):
                if m.is_terminated():
                    break
                m.fill_next_token_bitmask(out, i)
                if i == len(drafts) or not m.accept_token(drafts[i]):
                    break
                accepted += 1
        finally:
            if accepted:
                m.rollback(accepted)

    def commit(self, tokens: list[int]) -> tuple[list[int], str | None]:
        """Advance by committed tokens; returns (the tokens up to and including the one that
        terminates the grammar, or all; an error if the grammar refused one, else None)."""
        for j, tok in enumerate(tokens):
            if self._matcher.is_terminated():
                return tokens[:j], None
            if not self._matcher.accept_token(tok):
                return tokens[:j], (f"structured output: token {tok} does not continue the {self.grammar.description} "
                                    f"after {j} of this step's tokens")
        return tokens, None


def step_bitmask(grammars: list[RequestGrammar | None], drafts: list[list[int]], verify_lens: list[int],
                 num_rows: int, vocab_size: int) -> torch.Tensor:
    """int32 [B, num_rows, W] host bitmask of a step: per constrained row its `step_rows` over
    its verified drafts, all-allowed elsewhere (rows of requests without a grammar, rows
    past a row's verify length)."""
    width = bitmask_width(vocab_size)
    bitmask = torch.full((len(grammars), num_rows, width), -1, dtype=torch.int32)
    for b, g in enumerate(grammars):
        if g is not None:
            n = verify_lens[b]
            g.step_rows(drafts[b][:n], bitmask[b, : n + 1])
    return bitmask
