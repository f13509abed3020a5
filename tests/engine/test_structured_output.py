"""Structured output under speculation keeps the exact constrained law (spec/grammar.py),
and the engine around it: free requests untouched, overlap, a grammar failure.

TEST DOUBLES: a tiny random float64 target (16 tokens) and a deliberately mismatched random
drafter stand in for the real model (thousands of draws of the real SmolLM2 would take
minutes on 2 cores); the vocabulary is a hand-built 16-token one (`TOY_VOCAB`), and the
grammar a choice of 32 two-letter strings, two of which have two spellings ("ab" and
"a"+"b"): most tokens are allowed at the first position, so a draft is often valid and
often not, which is where the biased rules differ from the exact one.
Everything between them is the real code: the engine, its runner, the drafter's sampling,
the grammar rows (xgrammar), the mask op and the verifier.

The oracle never calls that code: the exact law of a constrained completion (a token path
ending in EOS) is the product over its tokens of the target's masked next-token
probabilities, computed with transformers' own forward of the same weights and a mask
derived from plain string prefixes. A chi-square test compares the engine's path
frequencies with it; two plausible but biased rules (the reference's §3: truncating at an
invalid draft and sampling p' there; verifying raw drafts against the masked q') must fail
the same test.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import ascend_dspark.engine.runner as runner_module
from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.engine.step_costs import StepCosts
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import EOS, tiny_target
from engine_doubles import one_thread  # noqa: F401  (autouse: one torch thread)

xgr = pytest.importorskip("xgrammar")
from ascend_dspark.spec.grammar import GrammarCompiler  # noqa: E402

TOY_VOCAB = ["X", "Y", "</s>", "a", "b", "c", "d", "e", "f", "g", "h", "ab", "cd", "ef", "gh", "Z"]
CHOICES = [x + y for x in "abcdefgh" for y in "abcd"]          # 32 strings, 34 token paths
PROMPT = [1, 5, 9]
DRAWS = 3000
SEED_BASE = 500_000


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return tiny_target("llama", dtype=torch.float64, vocab=len(TOY_VOCAB), std=0.1)


@pytest.fixture(scope="module")
def law(models):
    return exact_law(models[1])


@pytest.fixture(scope="module")
def grammar():
    info = xgr.TokenizerInfo(TOY_VOCAB, vocab_size=len(TOY_VOCAB), stop_token_ids=[EOS])
    return GrammarCompiler(info, len(TOY_VOCAB)).choice(CHOICES)


def mismatched_drafter(kind, target):
    """A random drafter, sharpened so that its q is far from p and often off the grammar."""
    torch.manual_seed(7)
    drafter = create_drafter(kind, target).to(torch.float64)
    with torch.no_grad():
        for p in drafter.parameters():
            p.mul_(4.0)
    return drafter


# ---------------------------------------------------------------- the oracle

def allowed_next(text: str) -> list[int]:
    """Tokens the choice grammar allows after `text`, by string prefixes alone."""
    ok = [t for t, s in enumerate(TOY_VOCAB) if t != EOS and any(c.startswith(text + s) for c in CHOICES)]
    return ok + ([EOS] if text in CHOICES else [])


def exact_law(hf, temperature: float = 1.0) -> dict[tuple[int, ...], float]:
    """Every complete token path (ending in EOS) with its probability under masked plain
    sampling: transformers' forward of the whole sequence at every node."""
    law: dict[tuple[int, ...], float] = {}

    def walk(path: tuple[int, ...], text: str, prob: float) -> None:
        if path and path[-1] == EOS:
            law[path] = prob
            return
        with torch.inference_mode():
            logits = hf(torch.tensor([PROMPT + list(path)])).logits[0, -1].double() / temperature
        allowed = allowed_next(text)
        probs = torch.softmax(logits[allowed], -1)
        for tok, p in zip(allowed, probs.tolist()):
            walk(path + (tok,), text + ("" if tok == EOS else TOY_VOCAB[tok]), prob * p)

    walk((), "", 1.0)
    return law


def chi_square_p(paths: list[tuple[int, ...]], law: dict) -> float:
    """Chi-square p-value of the paths' counts against the law (a path outside it: 0.0). The
    rarest cells are pooled until the pool expects at least 5."""
    if any(p not in law for p in paths):
        return 0.0
    keys = sorted(law, key=law.get)
    observed = np.array([paths.count(k) for k in keys], dtype=float)
    expected = np.array([law[k] for k in keys]) * len(paths)
    cut = int(np.searchsorted(np.cumsum(expected), 5.0)) + 1           # cells 0..cut-1 pooled
    obs = np.append(observed[cut:], observed[:cut].sum())
    exp = np.append(expected[cut:], expected[:cut].sum())
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


# ---------------------------------------------------------------- the engine

def sample_paths(target, drafter, grammar, k: int = 3, temperature: float = 1.0, seeded: bool = True,
                 **engine_options) -> list[tuple[int, ...]]:
    engine = Engine(target, drafter, num_speculative_tokens=max(k, 1), max_model_len=24, max_batch_size=DRAWS,
                    max_prefill_tokens=DRAWS * len(PROMPT), **engine_options)
    sample_paths.engine = engine
    base = SamplingParams(temperature=temperature, max_tokens=10, grammar=grammar)
    if seeded:
        params = [SamplingParams(**{**base.__dict__, "seed": SEED_BASE + i}) for i in range(DRAWS)]
    else:
        random.seed(SEED_BASE)
        params = [base] * DRAWS
    outs = engine.generate([PROMPT] * DRAWS, params)
    assert all(o.finish_reason == "stop" for o in outs)
    return [tuple(o.token_ids) for o in outs]


def test_oracle_mask_agrees_with_the_compiled_grammar(grammar):
    """The oracle's string-prefix mask and xgrammar's rows say the same along every path."""
    from ascend_dspark.spec.grammar import RequestGrammar, step_bitmask

    def walk(path: tuple[int, ...], text: str) -> None:
        g = RequestGrammar(grammar)
        assert g.commit(list(path)) == (list(path), None)
        row = step_bitmask([g], [[]], [0], 1, len(TOY_VOCAB))[0, 0]
        allowed = [t for t in range(len(TOY_VOCAB)) if (int(row[t // 32]) >> (t % 32)) & 1]
        assert sorted(allowed) == sorted(allowed_next(text)), (path, text)
        for tok in allowed_next(text):
            if tok != EOS:
                walk(path + (tok,), text + TOY_VOCAB[tok])

    walk((), "")


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_speculative_constrained_sampling_is_the_masked_law(models, law, grammar, kind):
    target, _ = models
    paths = sample_paths(target, mismatched_drafter(kind, target), grammar, speculation="fixed")
    assert sample_paths.engine.depth_counts[3] > 0
    assert len(law) == 34
    assert chi_square_p(paths, law) > 1e-3


def test_confidence_policy_constrained_is_the_masked_law(models, law, grammar):
    """DFlash under the confidence policy: depths planned per step (3 first, then plain steps
    once the mismatched draft keeps failing); the rows are masked for whatever depth runs."""
    target, _ = models
    costs = StepCosts(batch_sizes=[1, DRAWS], depths=[0, 1, 2, 3], seconds=[[1.0, 2.5, 2.7, 2.9]] * 2, padded=False)
    paths = sample_paths(target, mismatched_drafter("dflash", target), grammar, seeded=False,
                         speculation="confidence", step_costs=costs, overlap=False)
    depths = sample_paths.engine.depth_counts
    assert depths[3] > 0 and depths[0] > 0, depths
    assert chi_square_p(paths, law) > 1e-3


def _biased_verify(kind: str):
    """A verifier that sees the masked target logits and breaks the rule in one of two ways."""
    real = runner_module.verify

    def wrong(logits, drafts, draft_probs, verify_lens, sampling, first_position):
        off = ~torch.isfinite(logits)                                          # masked tokens, per row
        k = drafts.shape[1]
        if kind == "truncate":          # stop before the first invalid draft; that position samples p'
            invalid = off[:, :k].gather(-1, drafts.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            valid_prefix = (~invalid).long().cumprod(-1).sum(-1)
            verify_lens = torch.minimum(verify_lens, valid_prefix)
        else:                           # raw drafts verified against the masked q'
            q = draft_probs.masked_fill(off[:, :k], 0.0)
            draft_probs = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
        return real(logits, drafts, draft_probs, verify_lens, sampling, first_position)

    return wrong


@pytest.mark.parametrize("kind", ["truncate", "masked_q"])
def test_biased_rules_are_detected(models, law, grammar, monkeypatch, kind):
    target, _ = models
    monkeypatch.setattr(runner_module, "verify", _biased_verify(kind))
    paths = sample_paths(target, mismatched_drafter("dspark", target), grammar, speculation="fixed")
    assert chi_square_p(paths, law) < 1e-3


def test_plain_constrained_sampling_is_the_masked_law(models, law, grammar):
    target, _ = models
    paths = sample_paths(target, None, grammar, k=0)
    assert chi_square_p(paths, law) > 1e-3


# ---------------------------------------------------------------- engine behaviour

def test_requests_without_a_format_do_no_grammar_work(models, grammar, monkeypatch):
    """No format in the batch: no mask is built and the step is the plain one (a graph where
    the platform has them, overlap where it is on)."""
    target, _ = models
    import ascend_dspark.spec.grammar as grammar_module

    def refuse(*args, **kwargs):
        raise AssertionError("grammar work for a batch without a format")

    monkeypatch.setattr(runner_module, "step_bitmask", refuse)
    monkeypatch.setattr(grammar_module, "step_bitmask", refuse)
    engine = Engine(target, mismatched_drafter("dspark", target), num_speculative_tokens=3, max_model_len=24,
                    max_batch_size=2, speculation="fixed", overlap=True)
    outs = engine.generate([PROMPT, PROMPT], SamplingParams(temperature=1.0, max_tokens=6, seed=1, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [6, 6]


def test_constrained_and_free_requests_share_an_overlapped_batch(models, grammar):
    """With overlap on, a constrained request's steps are read at once (its next masks need
    them); a free request beside it gets exactly what it gets alone."""
    target, _ = models
    drafter = mismatched_drafter("dspark", target)
    engine = Engine(target, drafter, num_speculative_tokens=3, max_model_len=24, max_batch_size=2,
                    speculation="fixed", overlap=True)
    free = SamplingParams(temperature=1.0, max_tokens=8, seed=3, ignore_eos=True)
    alone = engine.generate([PROMPT], free)[0].token_ids
    outs = engine.generate([PROMPT, PROMPT], [SamplingParams(temperature=1.0, max_tokens=10, seed=4, grammar=grammar),
                                              free])
    assert outs[1].token_ids == alone
    text = "".join(TOY_VOCAB[t] for t in outs[0].token_ids[:-1])
    assert outs[0].finish_reason == "stop" and outs[0].token_ids[-1] == EOS and text in CHOICES


def test_a_grammar_failure_aborts_that_request_only(models, grammar, monkeypatch):
    """A committed token the grammar refuses (impossible by construction, forced here) ends
    that request with an error; the engine and the other request go on."""
    target, _ = models
    from ascend_dspark.spec.grammar import RequestGrammar

    monkeypatch.setattr(RequestGrammar, "commit", lambda self, tokens: ([], "structured output: forced failure"))
    engine = Engine(target, mismatched_drafter("dspark", target), num_speculative_tokens=3, max_model_len=24,
                    max_batch_size=2, speculation="fixed")
    engine.add_request("bad", PROMPT, SamplingParams(temperature=1.0, max_tokens=10, seed=4, grammar=grammar))
    engine.add_request("free", PROMPT, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finals = {}
    while engine.has_unfinished():
        for d in engine.step():
            if d.finished:
                finals[d.request_id] = d
    assert finals["bad"].finish_reason == "abort" and "forced failure" in finals["bad"].error
    assert finals["bad"].num_output_tokens == 0
    assert finals["free"].finish_reason == "length" and finals["free"].num_output_tokens == 5
    assert engine.num_used_kv_blocks == 0
