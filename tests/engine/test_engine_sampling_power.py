"""T>0 through the engine, with power: most drafts accepted, the bonus path taken often,
and the expected law written from the definitions, not from the code under test.

Why another distribution test: with random drafts almost nothing is accepted, so an
engine-level chi-square sees only the rejection path (a bonus drawn from q passes it), and
an expected law built with `SamplingBatch.probs` moves together with a sampling bug (a
top-p that keeps one token too few passes it). Here:
- the target's exact joint of the first three generated tokens comes from transformers'
  logits after every two-token continuation (8^2 sequences) and a closed-form temperature
  / top-k / top-p / min-p written in this file (`closed_form_probs`), never from
  ascend_dspark.spec or ops.sampling;
- a drafter double proposes from q = LAMBDA * p + (1 - LAMBDA) * r, with p the
  closed-form target law of the context it was told and r the same probabilities in
  reverse rank order: at least LAMBDA of the drafts are accepted, and q stays far enough
  from p for every wrong rule to show. With K = 1 the first step's bonus is the third
  token in ~80% of requests, the rejections' residuals are the second, and the second
  step's draft / residual / bonus the third: accept, residual and bonus all shape the
  compared joint;
- 6000 seeded requests run in one batch (fixed seeds: the test is deterministic), and the
  chi-square must pass for the real verifier and fail for broken verifiers patched in:
  residual from q, bonus from q, every draft accepted, acceptance with probability p(x)
  (no ratio), and acceptance min(1, q/p). (Literally dropping the min(1, .) of
  min(1, p/q) is an equivalent mutant: the coin u < p/q, u in (0, 1), is then true
  whenever p >= q, exactly as with the min.)
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from engine_doubles import one_thread  # noqa: F401  (autouse: single-threaded)
from scipy.stats import chisquare

import ascend_dspark.engine.runner as runner_module
from ascend_dspark.drafters.base import DraftProposal
from ascend_dspark.engine.engine import Engine
from ascend_dspark.spec.sampling import SamplingParams, Stream
from ascend_dspark.spec.verify import VerifyResult
from tests.helpers import tiny_target

V = 8
PROMPT = [1, 5, 2]
N = 6000
SEED_BASE = 7_000_000
LAMBDA = 0.8
ALPHA = 1e-3
PARAMS = {
    "plain": SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
    "filtered": SamplingParams(temperature=0.8, top_k=6, top_p=0.85, min_p=0.08, max_tokens=3, ignore_eos=True),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours, hf = tiny_target("llama", dtype=torch.float64, vocab=V)
    return ours, hf


# ---------------------------------------------------------------- the independent oracle

def closed_form_probs(logits: torch.Tensor, params: SamplingParams, margin: float = 1e-4) -> torch.Tensor:
    """float64 [N, V]: for each row, the distribution the request samples from, written from
    the definitions one row at a time: logits / T; keep the top_k largest; of those keep the
    smallest prefix (largest first) whose mass reaches top_p; renormalise; drop tokens below
    min_p x the largest probability; renormalise. Asserts no row sits within `margin` of a
    top-p or min-p boundary (where float32 production and this float64 oracle could
    legitimately disagree)."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for n, row in enumerate(logits.double().tolist()):
        z = [v / params.temperature for v in row]
        order = sorted(range(len(z)), key=lambda i: -z[i])
        kept = order[:params.top_k] if params.top_k else order
        top = z[kept[0]]
        w = {i: math.exp(z[i] - top) for i in kept}
        total = sum(w.values())
        if params.top_p < 1.0:
            mass, prefix = 0.0, []
            for i in kept:
                prefix.append(i)
                mass += w[i] / total
                assert abs(mass - params.top_p) > margin, "oracle ill-conditioned at the top-p boundary"
                if mass >= params.top_p:
                    break
            kept = prefix
        total = sum(w[i] for i in kept)
        probs = {i: w[i] / total for i in kept}
        if params.min_p > 0.0:
            floor = params.min_p * max(probs.values())
            assert all(abs(v - floor) > margin for v in probs.values()), "oracle ill-conditioned at min-p"
            probs = {i: v for i, v in probs.items() if v >= floor}
            total = sum(probs.values())
            probs = {i: v / total for i, v in probs.items()}
        for i, v in probs.items():
            out[n, i] = v
    return out


def conditional_tables(hf, params: SamplingParams) -> list[torch.Tensor]:
    """tables[d][c]: the law of generated token d + 1 after generated tokens c (base-V index
    of g_1..g_d), d = 0, 1, 2, from transformers' logits of every continuation."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=2)))              # [64, 2]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], dim=1)
    with torch.inference_mode():
        logits = hf(ids).logits                                                   # [64, 5, V]
    n = len(PROMPT)
    t0 = closed_form_probs(logits[:1, n - 1], params)                             # after the prompt
    t1 = closed_form_probs(logits[::V, n], params)                                # after g1 (rows g1*V + 0)
    t2 = closed_form_probs(logits[:, n + 1], params)                              # after (g1, g2)
    return [t0, t1, t2]


def exact_joint(tables) -> np.ndarray:
    """P(g1, g2, g3) over the V^3 cells, index g1*V^2 + g2*V + g3."""
    t0, t1, t2 = tables
    joint = t0[0].view(V, 1, 1) * t1.view(V, V, 1) * t2.view(V, V, V)
    return joint.flatten().numpy()


def chi_square_p(observed: np.ndarray, expected_p: np.ndarray) -> float:
    """Chi-square p-value, cells with expected count < 5 pooled; 0 if a zero-probability
    cell was observed (the target forbids that sequence)."""
    if observed[expected_p == 0].sum() > 0:
        return 0.0
    expected = expected_p / expected_p.sum() * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp).pvalue)


# ---------------------------------------------------------------- the drafter double

def reversed_ranks(p: torch.Tensor) -> torch.Tensor:
    """p with its probabilities handed out in reverse rank order: the likeliest token gets
    the smallest probability. Far from p, so every wrong rule moves the output visibly."""
    sorted_p, order = p.sort(-1, descending=True)
    return torch.zeros_like(p).scatter(-1, order, sorted_p.flip(-1))


class MixingDrafter:
    """TEST DOUBLE (duck-typed, keeps no cache): q = LAMBDA * p + (1 - LAMBDA) * r, where p
    is the closed-form target law after the generated tokens it was told (and its own
    earlier drafts; uniform where the tables end) and r = reversed_ranks(p). At least
    LAMBDA of the drafts are accepted. Drafts are drawn from q with the production DRAFT
    noise at their positions, as a real drafter does. Vectorised over the batch."""

    target_layer_ids = ()

    def __init__(self, tables, k: int) -> None:
        self.tables = tables
        self.max_draft_tokens = k
        self.gen = None                           # [slots, depth]: generated tokens it was told

    lookahead = 0

    def attach(self, tables, dtype=None):
        self.gen = torch.full((tables.num_seqs, tables.capacity), -1, dtype=torch.long)

    def reset(self, slot_ids):
        self.gen[slot_ids] = -1

    def observe(self, slot_ids, features, positions, next_tokens, counts, ctx=None):
        index = positions + 1 - len(PROMPT)                                  # generated-token index
        told = (torch.arange(positions.shape[1]) < counts.unsqueeze(1)) & (index >= 0)
        rows = slot_ids.unsqueeze(1).expand_as(index)
        self.gen[rows[told], index[told]] = next_tokens[told]

    def _p(self, context: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Closed-form p after `depth` generated tokens context[:, :depth] ([B, V])."""
        uniform = torch.full((len(depth), V), 1.0 / V, dtype=torch.float64)
        out = uniform.clone()
        for d, table in enumerate(self.tables):
            code = torch.zeros(len(depth), dtype=torch.long)
            for j in range(d):
                code = code * V + context[:, j].clamp(min=0)
            out = torch.where((depth == d).unsqueeze(1), table[code], out)
        return out

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        depth = anchor_positions + 1 - len(PROMPT)                           # generated tokens so far
        context = torch.cat([self.gen[slot_ids], torch.full((len(slot_ids), num_tokens), -1)], dim=1)
        tokens, probs = [], []
        for k in range(num_tokens):
            p = self._p(context, depth + k)
            q = (LAMBDA * p + (1 - LAMBDA) * reversed_ranks(p)).float()
            x = sampling.sample(q, anchor_positions + 1 + k, Stream.DRAFT).long()
            context[torch.arange(len(slot_ids)), depth + k] = x
            tokens.append(x)
            probs.append(q)
        return DraftProposal(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1))


# ---------------------------------------------------------------- broken verifiers (negative controls)

def plain_verifier(params: SamplingParams, bug: str | None = None, seed: int = 0):
    """A chain verifier written in this file (closed-form p, torch.Generator coins), with an
    optional deliberate bug; patched over the engine's `verify` for the negative controls.
    Without a bug it must pass the same test, so a failing control fails for its bug."""
    gen = torch.Generator().manual_seed(seed)

    def race(w: torch.Tensor) -> torch.Tensor:
        u = torch.rand(w.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        return (w / -u.log()).argmax(-1)

    def verify(target_logits, draft_tokens, draft_probs, verify_lens, sampling, first_position):
        b, k = draft_tokens.shape
        vocab = target_logits.shape[-1]
        p = closed_form_probs(target_logits.reshape(-1, vocab), params, margin=0.0).view(b, k + 1, vocab)
        q = draft_probs.double()
        rows = torch.arange(b)
        num_accepted = torch.full((b,), k, dtype=torch.long)
        final = torch.zeros(b, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        for j in range(k):
            x = draft_tokens[:, j]
            px, qx = p[rows, j, x], q[rows, j, x]
            if bug == "accept_p":
                a = px
            elif bug == "accept_all":
                a = torch.ones_like(px)
            elif bug == "accept_q_over_p":
                a = torch.where(px > 0, (qx / px).clamp(max=1), torch.zeros_like(px))
            else:
                a = torch.where(px >= qx, torch.ones_like(px), px / qx)
            reject = ~done & (torch.rand(b, generator=gen, dtype=torch.float64) >= a)
            residual = (p[:, j] - q[:, j]).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 1e-12, residual, p[:, j])
            if bug == "residual_from_q":
                residual = q[:, j]
            final = torch.where(reject, race(residual), final)
            num_accepted = torch.where(reject, torch.full_like(num_accepted, j), num_accepted)
            done |= reject
        bonus = race(q[:, k - 1] if bug == "bonus_from_q" else p[:, k])
        final = torch.where(done, final, bonus)
        tokens = torch.full((b, k + 1), -1, dtype=torch.long)
        for j in range(k + 1):
            tokens[:, j] = torch.where(j < num_accepted, draft_tokens[:, min(j, k - 1)],
                                       torch.where(j == num_accepted, final, tokens[:, j]))
        return VerifyResult(num_accepted=num_accepted, tokens=tokens)

    return verify


# ---------------------------------------------------------------- the runs

def sample_joint(target, tables, params: SamplingParams, k: int):
    """Counts of (g1, g2, g3) over N seeded requests in one batch, and the fraction of
    requests whose first verify step accepted every draft (took the bonus path)."""
    engine = Engine(target, MixingDrafter(tables, k), num_speculative_tokens=k, max_model_len=16, max_batch_size=N,
                    speculation="fixed")
    requests = [SamplingParams(**{**params.__dict__, "seed": SEED_BASE + i}) for i in range(N)]
    outs = engine.generate([PROMPT] * N, requests)
    cells = np.array([(o.token_ids[0] * V + o.token_ids[1]) * V + o.token_ids[2] for o in outs])
    bonus = np.mean([o.stats.accepted_lengths[0] == k + 1 for o in outs])
    return np.bincount(cells, minlength=V ** 3), bonus


@pytest.mark.parametrize("name", list(PARAMS))
def test_engine_output_follows_the_exact_joint(models, name):
    target, hf = models
    params = PARAMS[name]
    tables = conditional_tables(hf, params)
    observed, bonus = sample_joint(target, tables, params, k=1)
    p = chi_square_p(observed, exact_joint(tables))
    assert p > ALPHA, f"{name}: chi-square p = {p:.2e}"
    # A drafter this close to the target gets most drafts accepted; if not, the test has lost
    # its power, or the target's p is not the law the closed form says (the oracle again).
    assert bonus > 0.7, f"the bonus path ran in only {bonus:.0%} of first steps"


def test_plain_verifier_of_this_file_passes(models, monkeypatch):
    """The negative controls below swap in this file's verifier with one bug; without the bug
    it passes, so each control fails for its bug, not for being another implementation."""
    target, hf = models
    params = PARAMS["plain"]
    tables = conditional_tables(hf, params)
    monkeypatch.setattr(runner_module, "verify", plain_verifier(params))
    observed, _ = sample_joint(target, tables, params, k=1)
    assert chi_square_p(observed, exact_joint(tables)) > ALPHA


@pytest.mark.parametrize("bug", ["residual_from_q", "bonus_from_q", "accept_all", "accept_p", "accept_q_over_p"])
def test_broken_verifiers_are_caught(models, monkeypatch, bug):
    target, hf = models
    params = PARAMS["plain"]
    tables = conditional_tables(hf, params)
    monkeypatch.setattr(runner_module, "verify", plain_verifier(params, bug))
    observed, _ = sample_joint(target, tables, params, k=1)
    p = chi_square_p(observed, exact_joint(tables))
    assert p < 1e-6, f"{bug}: chi-square p = {p:.2e}, the test cannot see this bug"
