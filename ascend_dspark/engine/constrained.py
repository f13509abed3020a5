"""The engine's side of structured output (a request whose `SamplingParams.grammar` is set).

Its steps mask the target's rows with the grammar (spec/grammar.py says why that stays
lossless), which needs the step's drafts on the host between the proposal and verification.
A decode batch holding such a request therefore runs its steps eagerly (no graph replay),
one step per launch and without overlap (the next step's masks need this step's tokens);
batches without one are untouched: no mask, no host read, graphs and overlap as before.

Here: checking a request's grammar when it is added (`grammar_for`), and advancing its
matcher by the tokens each step commits (`follow_grammar`).
"""

from __future__ import annotations

import functools
import logging

from ascend_dspark.spec.grammar import CompiledGrammar, RequestGrammar
from ascend_dspark.spec.sampling import SamplingParams

from .request import Request

logger = logging.getLogger(__name__)


def grammar_for(params: SamplingParams, vocab_size: int, tensor_parallel: bool, runs_ahead: bool,
                platform: str) -> RequestGrammar | None:
    """The matcher of a new request's grammar, None without one. Raises ValueError for a
    grammar this engine cannot follow. `runs_ahead`: the engine has graphs or overlap, which
    a constrained batch gives up (warned once per platform)."""
    if params.grammar is None:
        return None
    if not isinstance(params.grammar, CompiledGrammar):
        raise ValueError("SamplingParams.grammar must be a CompiledGrammar (spec.grammar.GrammarCompiler)")
    if params.grammar.vocab_size != vocab_size:
        raise ValueError(f"the grammar was compiled for a vocabulary of {params.grammar.vocab_size} tokens; "
                         f"this model has {vocab_size}")
    if tensor_parallel:
        # The followers' runners get the requests without their matchers (engine/tp_calls.py, `portable`):
        # their masks would differ from the driver's, and the ranks' tokens with them.
        raise ValueError("structured output (response_format / grammar) is not supported with tensor "
                         "parallelism yet: serve this request from a tensor_parallel_size=1 engine")
    if runs_ahead:
        _warn_constrained_eager(platform)
    return RequestGrammar(params.grammar)


def follow_grammar(r: Request, tokens: list[int]) -> list[int]:
    """Advance a constrained request's matcher by its committed tokens; the tokens up to
    the grammar's end. A token the grammar refuses (a bug: every committed token comes
    from a masked row) aborts this request with an error, never the engine."""
    if r.grammar is None:
        return tokens
    kept, error = r.grammar.commit(tokens)
    if error is not None:
        logger.error("request %s aborted: %s", r.request_id, error)
        r.error, r.finish_reason = error, "abort"
    return kept


@functools.lru_cache(maxsize=None)
def _warn_constrained_eager(platform: str) -> None:
    logger.warning("structured output on %s: steps of a batch holding a constrained request run eagerly (no graph "
                   "replay) and without overlap, since the grammar masks need each step's drafts on the host; "
                   "batches without one keep graphs and overlap", platform)
