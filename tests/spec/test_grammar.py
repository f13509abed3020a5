"""Grammar rows and matcher bookkeeping (spec/grammar.py) on small vocabularies.

A hand-built 16-token vocabulary for the row / commit rules, and the suite's character-level
tokenizer (tests/helpers.py) for JSON schemas, whose walks are checked with `jsonschema`.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.helpers import EOS, tiny_tokenizer

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
from ascend_dspark.spec.grammar import GrammarCompiler, GrammarError, RequestGrammar, step_bitmask  # noqa: E402

VOCAB = ["X", "Y", "</s>", "a", "b", "c", "d", "e", "f", "g", "h", "ab", "cd", "ef", "gh", "Z"]
A, B, C, D, AB, Z = 3, 4, 5, 6, 11, 15


@pytest.fixture(scope="module")
def choice():
    info = xgr.TokenizerInfo(VOCAB, vocab_size=len(VOCAB), stop_token_ids=[EOS])
    return GrammarCompiler(info, len(VOCAB)).choice(["ab", "abc", "cd"])


def allowed(row: torch.Tensor) -> set[int]:
    return {t for t in range(len(VOCAB)) if (int(row[t // 32]) >> (t % 32)) & 1}


def rows_of(g: RequestGrammar, drafts: list[int]) -> list[set[int]]:
    bm = step_bitmask([g], [drafts], [len(drafts)], len(drafts) + 1, len(VOCAB))
    return [allowed(r) for r in bm[0]]


def after(grammar, tokens: list[int]) -> set[int]:
    """The mask of a fresh matcher fed `tokens` (the independent check of row i)."""
    g = RequestGrammar(grammar)
    assert g.commit(tokens) == (tokens, None)
    return rows_of(g, [])[0]


def test_rows_follow_the_drafts(choice):
    g = RequestGrammar(choice)
    rows = rows_of(g, [A, B, C])
    assert rows == [after(choice, []), after(choice, [A]), after(choice, [A, B]), after(choice, [A, B, C])]
    assert rows[0] == {A, AB, C, 12} and rows[2] == {C, EOS} and rows[3] == {EOS}
    assert rows_of(g, []) == [rows[0]]                       # rolled back: the committed state is untouched


def test_rows_past_an_invalid_draft_are_all_allowed(choice):
    g = RequestGrammar(choice)
    rows = rows_of(g, [A, Z, B])                             # Z is refused after "a"
    assert rows[:2] == [after(choice, []), after(choice, [A])]
    assert rows[2] == rows[3] == set(range(len(VOCAB)))      # never read: the Z draft is rejected for certain
    assert rows_of(g, [])[0] == rows[0]


def test_rows_stop_at_termination(choice):
    g = RequestGrammar(choice)
    rows = rows_of(g, [C, D, EOS, A])                        # "cd" then EOS: the grammar has ended
    assert rows[2] == {EOS} and rows[3] == rows[4] == set(range(len(VOCAB)))
    assert not g.terminated


def test_commit_cuts_at_termination_and_reports_a_refused_token(choice):
    g = RequestGrammar(choice)
    assert g.commit([AB, EOS, A]) == ([AB, EOS], None)
    assert g.terminated
    g = RequestGrammar(choice)
    kept, error = g.commit([A, Z])
    assert kept == [A] and "token 15" in error
    assert rows_of(g, [])[0] == after(choice, [A])          # the refused token left no trace


def test_rows_of_unconstrained_requests_and_past_the_verify_length_are_all_allowed(choice):
    g = RequestGrammar(choice)
    bm = step_bitmask([None, g], [[A, B], [A, B]], [2, 1], 3, len(VOCAB))
    assert (bm[0] == -1).all() and (bm[1, 2] == -1).all()
    assert allowed(bm[1, 1]) == after(choice, [A])


@pytest.fixture(scope="module")
def chars():
    tok = tiny_tokenizer(128)
    return tok, GrammarCompiler.for_tokenizer(tok, 128, [tok.eos_token_id])


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "c": {"enum": ["red", "blue"]}}, "required": ["name", "n", "c"]}


def test_random_walks_through_the_masks_are_valid_json(chars):
    tok, compiler = chars
    schema = SCHEMA
    grammar = compiler.json_schema(schema)
    rng = random.Random(0)
    for _ in range(20):
        g, out = RequestGrammar(grammar), []
        while not g.terminated and len(out) < 200:
            row = step_bitmask([g], [[]], [0], 1, 128)[0, 0]
            options = [t for t in range(128) if (int(row[t // 32]) >> (t % 32)) & 1]
            nxt = rng.choice(options)
            if tok.eos_token_id in options and rng.random() < 0.5:
                nxt = tok.eos_token_id
            assert g.commit([nxt]) == ([nxt], None)
            out.append(nxt)
        assert g.terminated and out[-1] == tok.eos_token_id
        jsonschema.validate(json.loads(tok.decode(out[:-1])), schema)


def test_json_object_takes_objects_only(chars):
    tok, compiler = chars
    grammar = compiler.json_object()
    ids = tok.encode('{"a": [1, {"b": null}]}', add_special_tokens=False) + [tok.eos_token_id]
    g = RequestGrammar(grammar)
    assert g.commit(ids) == (ids, None) and g.terminated
    kept, error = RequestGrammar(grammar).commit(tok.encode("[1]", add_special_tokens=False))
    assert kept == [] and error is not None


@pytest.mark.parametrize("bad", ['{"type": "nonsense"}', "{not json", {"type": "object", "properties": 3}])
def test_bad_schemas_are_grammar_errors(chars, bad):
    with pytest.raises(GrammarError):
        chars[1].json_schema(bad)


def test_bad_choices_are_grammar_errors(chars):
    for bad in ([], [""], ["ok", 3]):
        with pytest.raises(GrammarError):
            chars[1].choice(bad)
