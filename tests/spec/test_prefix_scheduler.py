"""DSpark's prefix scheduler: Algorithm 1 against hand-computed optima, the padded planner
against brute force, and the early break's losslessness on the paper's Appendix A
counterexample (the variant without the break must be caught biased)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from ascend_dspark.spec.prefix_scheduler import best_depth, schedule_prefix, survival
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams
from ascend_dspark.spec.verify import verify


def sps_by_tokens(table: dict[int, float]):
    """The paper's SPS(B): a function of the tokens in the (flattened) verify batch."""
    return lambda num_requests, num_tokens, depth: table[num_tokens]


def test_survival_is_the_running_product():
    assert survival([0.5, 0.5, 1.0, 0.2]) == [0.5, 0.25, 0.25, 0.05]
    assert survival([]) == []


def test_appendix_a_with_the_break_never_verifies():
    """R = 1, c_1 = 0.8; SPS(1) = 1, SPS(2) = 0.5, SPS(3) = 0.45. Theta_0 = 1.0 beats
    Theta_1 = 1.8 * 0.5 = 0.9, so the break stops before c_2 is looked at: l = 0 whatever x_1."""
    sps = sps_by_tokens({1: 1.0, 2: 0.5, 3: 0.45})
    assert schedule_prefix([[0.8, 0.9]], sps) == [0]
    assert schedule_prefix([[0.8, 0.0]], sps) == [0]


def test_appendix_a_without_the_break_lets_the_draft_decide():
    """Theta_2 = (1 + 0.8 + 0.72) * 0.45 = 1.134 > 1.0 when c_2 = 0.9; with c_2 = 0 the
    candidate (1, 2) does not exist and Theta_0 wins."""
    sps = sps_by_tokens({1: 1.0, 2: 0.5, 3: 0.45})
    assert schedule_prefix([[0.8, 0.9]], sps, early_break=False) == [2]
    assert schedule_prefix([[0.8, 0.0]], sps, early_break=False) == [0]


def test_two_requests_by_hand():
    """Candidates in order: (r0, 1) a = 0.9, (r1, 1) a = 0.6, (r0, 2) a = 0.45.
    Theta: B=2: 2 * 1.0 = 2.0; B=3: 2.9 * 0.9 = 2.61; B=4: 3.5 * 0.8 = 2.8;
    B=5: 3.95 * 0.6 = 2.37 (stop) -> [1, 1]."""
    conf = [[0.9, 0.5], [0.6]]
    assert schedule_prefix(conf, sps_by_tokens({2: 1.0, 3: 0.9, 4: 0.8, 5: 0.6})) == [1, 1]
    # SPS(5) = 0.75: 3.95 * 0.75 = 2.9625 > 2.8 -> r0 verifies 2.
    assert schedule_prefix(conf, sps_by_tokens({2: 1.0, 3: 0.9, 4: 0.8, 5: 0.75})) == [2, 1]


def test_a_cliff_stops_the_break_but_not_the_global_search():
    """SPS(4) = 0.65 is a cliff: 3.5 * 0.65 = 2.275 < 2.61 stops the break at [1, 0]; past it
    3.95 * 0.7 = 2.765 > 2.61, which only the search without the break reaches."""
    conf = [[0.9, 0.5], [0.6]]
    sps = sps_by_tokens({2: 1.0, 3: 0.9, 4: 0.65, 5: 0.7})
    assert schedule_prefix(conf, sps) == [1, 0]
    assert schedule_prefix(conf, sps, early_break=False) == [2, 1]


def test_ties_keep_the_admitted_set_a_prefix():
    """c = 1 makes a_{r,j} = a_{r,j+1}: the tie-break on j must admit j before j + 1."""
    sps = sps_by_tokens({b: 1.0 / (1 + 0.01 * b) for b in range(1, 20)})
    for conf in ([[1.0, 1.0, 1.0]], [[0.9, 1.0, 1.0], [1.0, 1.0]], [[1.0, 0.5, 1.0, 1.0]]):
        lengths = schedule_prefix(conf, sps)
        assert all(0 <= length <= len(c) for length, c in zip(lengths, conf))


def brute_force_padded(conf, caps, depths, seconds):
    """Every per-request length vector (each l_r <= cap_r), run as a padded step at any depth
    in `depths` that holds max(l): the best expected tokens per second."""
    best = 0.0
    for lengths in itertools.product(*[range(cap + 1) for cap in caps]):
        need = max(lengths)
        fits = [d for d in depths if d >= need]
        if not fits:
            continue
        tau = len(conf)
        for c, length in zip(conf, lengths):
            a = 1.0
            for j in range(length):
                a *= c[j]
                tau += a
        best = max(best, max(tau / seconds(len(conf), d) for d in fits))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_best_depth_matches_brute_force(seed):
    rng = random.Random(seed)
    num_requests, k = rng.randint(1, 3), rng.randint(1, 4)
    conf = [[rng.random() for _ in range(k)] for _ in range(num_requests)]
    caps = [rng.randint(0, k) for _ in range(num_requests)]
    depths = sorted({0, k} | {rng.randint(0, k) for _ in range(2)})
    cost = {d: 1.0 + rng.random() * d for d in range(k + 1)}
    seconds = lambda r, d: cost[d] * (1 + 0.1 * r)      # noqa: E731
    depth = best_depth(conf, caps, depths, lambda r, t, d: 1.0 / seconds(r, d))
    assert depth in depths
    tau = num_requests + sum(sum(survival(c)[:min(depth, cap)]) for c, cap in zip(conf, caps))
    assert tau / seconds(num_requests, depth) == pytest.approx(brute_force_padded(conf, caps, depths, seconds))


def test_best_depth_picks_plain_decoding_when_drafting_does_not_pay():
    """Depth d costs 1 + d: even certain drafts (c = 1) give (1 + d) / (1 + d) = 1, a tie,
    and ties go to the shallower depth; any c < 1 makes 0 strictly best."""
    sps = lambda r, t, d: 1.0 / (1.0 + d)      # noqa: E731
    assert best_depth([[1.0] * 4], [4], [0, 1, 2, 4], sps) == 0
    assert best_depth([[0.99] * 4], [4], [0, 1, 2, 4], sps) == 0
    # nearly free drafting: verify everything
    assert best_depth([[0.5] * 4], [4], [0, 1, 2, 4], lambda r, t, d: 1.0 / (1.0 + 0.01 * d)) == 4


# -- Appendix A through the real verifier ------------------------------------------------------
TARGET = (0.7, 0.3)
DRAFT = (0.5, 0.5)
DRAWS = 20_000


def first_token_frequencies(early_break: bool) -> np.ndarray:
    """One request per row, vocabulary {A, B}: x_1, x_2 ~ DRAFT; c_1 = 0.8 and c_2 = 0.9 if
    x_1 = A else 0 (the confidence depends on the sampled draft, as DSpark's does);
    Algorithm 1 picks each row's verify length from these *current* confidences; the
    engine's verifier then accepts / corrects. Returns counts of the first output token."""
    gen = torch.Generator().manual_seed(11)
    drafts = torch.multinomial(torch.tensor(DRAFT).expand(DRAWS, -1), 2, replacement=True, generator=gen)
    sps = sps_by_tokens({1: 1.0, 2: 0.5, 3: 0.45})
    lengths = [schedule_prefix([[0.8, 0.9 if x1 == 0 else 0.0]], sps, early_break)[0] for x1 in drafts[:, 0].tolist()]
    sampling = SamplingBatch([SamplingParams(temperature=1.0, seed=1_000 + i) for i in range(DRAWS)], torch.device("cpu"))
    logits = torch.tensor(TARGET).log().expand(DRAWS, 3, -1).contiguous()
    draft_probs = torch.tensor(DRAFT).expand(DRAWS, 2, -1).contiguous()
    result = verify(logits, drafts, draft_probs, torch.tensor(lengths), sampling, torch.full((DRAWS,), 10))
    return np.bincount(result.tokens[:, 0].numpy(), minlength=2)


def test_with_the_break_the_output_follows_the_target():
    observed = first_token_frequencies(early_break=True)
    assert chisquare(observed, np.array(TARGET) * DRAWS).pvalue > 1e-3


def test_without_the_break_the_output_is_biased():
    """Negative control: the retrospective search gives about (0.85, 0.15)."""
    observed = first_token_frequencies(early_break=False)
    assert chisquare(observed, np.array(TARGET) * DRAWS).pvalue < 1e-6
    assert observed[0] / DRAWS == pytest.approx(0.85, abs=0.01)
