"""T>0: speculative sampling draws exactly from the target's distribution.

A tiny-vocabulary target (8 tokens) makes the exact distribution of the first generated
tokens computable by enumeration. 20k seeded requests run through the real engine with
each (random, deliberately mismatched) drafter; a chi-square test compares the joint
frequencies of generated tokens 2 and 3 (the first ones that go through verification)
with the exact target marginal. Replacing the verifier's residual rule by a plausible but
wrong one must make the same test fail: the test has power.
"""

from __future__ import annotations

import copy
import itertools
import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import ascend_dspark.spec.verify as verify_module
from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.engine.step_costs import StepCosts
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams
from tests.helpers import new_cache, tiny_target

VOCAB = 8
PROMPT = [1, 5, 2]
DRAWS = 20_000
SEED_BASE = 1_000_000      # fixed seeds: the test is deterministic
PARAMS = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
          SamplingParams(temperature=0.7, top_k=6, top_p=0.95, max_tokens=3, ignore_eos=True)]


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    ours, _ = tiny_target("llama", dtype=torch.float64, vocab=VOCAB)
    return ours


def exact_marginal(target, params: SamplingParams) -> np.ndarray:
    """P(t2, t3) under the target with the request's sampling transforms, by enumeration."""
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=3)))
    ids = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], dim=1)
    cache = new_cache(target, num_slots=len(seqs), capacity=ids.shape[1])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    slots = torch.arange(len(seqs))
    out = target(ids, positions, cache, slots, torch.ones_like(ids, dtype=torch.bool))
    probs = SamplingBatch([params] * len(seqs), torch.device("cpu")).probs(target.logits(out.hidden))
    n = len(PROMPT)
    joint = torch.ones(len(seqs), dtype=torch.float64)
    for i in range(3):
        joint *= probs[torch.arange(len(seqs)), n - 1 + i, seqs[:, i]].double()
    return joint.view(VOCAB, VOCAB * VOCAB).sum(0).numpy()


def sampled_marginal(target, drafter, params: SamplingParams, k: int, seeded: bool = True,
                     **engine_options) -> np.ndarray:
    engine = Engine(target, drafter, num_speculative_tokens=k, max_model_len=16, max_batch_size=DRAWS,
                    max_prefill_tokens=DRAWS * len(PROMPT), **engine_options)   # all prompts in one prefill step
    sampled_marginal.engine = engine
    if seeded:
        requests = [SamplingParams(**{**params.__dict__, "seed": SEED_BASE + i}) for i in range(DRAWS)]
    else:                   # the engine draws each seed: from Python's generator, seeded here
        random.seed(SEED_BASE)
        requests = [params] * DRAWS
    outs = engine.generate([PROMPT] * DRAWS, requests)
    cells = np.array([o.token_ids[1] * VOCAB + o.token_ids[2] for o in outs])
    return np.bincount(cells, minlength=VOCAB * VOCAB)


def chi_square_p(observed: np.ndarray, expected_p: np.ndarray) -> float:
    """Chi-square p-value, pooling cells with expected count < 5 into one."""
    expected = expected_p / expected_p.sum() * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp).pvalue


def mismatched_drafter(kind, target):
    torch.manual_seed(7)
    drafter = create_drafter(kind, target).to(torch.float64)
    with torch.no_grad():                 # sharpen the draft so q is far from p
        for p in drafter.parameters():
            p.mul_(4.0)
    return drafter


@pytest.mark.parametrize("kind", ["eagle3", "dflash", "dspark"])
def test_speculative_sampling_matches_target_distribution(target, kind):
    for params in PARAMS:
        drafter = mismatched_drafter(kind, target)
        observed = sampled_marginal(target, drafter, params, k=3)
        p = chi_square_p(observed, exact_marginal(target, params))
        assert p > 1e-3, f"{kind} {params}: chi-square p = {p:.2e}"


def test_confidence_policy_matches_target_distribution(target):
    """The confidence policy plans each step's depth from the acceptances already read: the
    first verify step drafts 3 (the optimistic prior pays for the step cost below), the
    mismatched draft's rejections then make plain steps (depth 0) the better choice. Both
    kinds of step feed tokens 2 and 3, whose joint law must stay the target's."""
    costs = StepCosts(batch_sizes=[1, 256], depths=[0, 1, 2, 3], seconds=[[1.0, 2.5, 2.7, 2.9]] * 2, padded=False)
    drafter = mismatched_drafter("dspark", target)
    # Unseeded requests (a seeded one always verifies its cap); each step plans from the one before.
    observed = sampled_marginal(target, drafter, PARAMS[0], k=3, seeded=False, speculation="confidence",
                                step_costs=costs, overlap=False)
    depths = sampled_marginal.engine.depth_counts
    assert depths[3] > 0 and depths[0] > 0, depths
    assert chi_square_p(observed, exact_marginal(target, PARAMS[0])) > 1e-3


def test_plain_sampling_matches_target_distribution(target):
    observed = sampled_marginal(target, None, PARAMS[0], k=0)
    assert chi_square_p(observed, exact_marginal(target, PARAMS[0])) > 1e-3


def test_wrong_residual_rule_is_detected(target, monkeypatch):
    """Sampling the correction from p instead of norm(max(0, p - q)) biases the output."""
    monkeypatch.setattr(verify_module, "residual_distribution", lambda p, q: p)
    observed = sampled_marginal(target, mismatched_drafter("dspark", target), PARAMS[0], k=3)
    assert chi_square_p(observed, exact_marginal(target, PARAMS[0])) < 1e-3


def test_seeded_requests_reproduce(target):
    drafter = mismatched_drafter("dspark", target)
    engine = Engine(target, drafter, num_speculative_tokens=3, max_model_len=32, max_batch_size=8)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPT], params)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=12, seed=99, ignore_eos=True)
    in_batch = engine.generate([[3, 3], PROMPT, [4]], [other, params, other])[1].token_ids
    assert alone == in_batch == engine.generate([PROMPT], params)[0].token_ids


@pytest.mark.cuda
def test_speculative_sampling_on_cuda_matches_target_distribution(target):
    """The same counter-based noise on the GPU: the dspark run is exact there too."""
    cuda_target = copy.deepcopy(target).to("cuda")
    drafter = mismatched_drafter("dspark", cuda_target)
    observed = sampled_marginal(cuda_target, drafter, PARAMS[0], k=3)
    assert chi_square_p(observed, exact_marginal(target, PARAMS[0])) > 1e-3
