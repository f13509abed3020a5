"""DSpark's hardware-aware choice of how many drafts each request verifies (paper §3.2, §5.2).

A verify step commits, in expectation, tau = R + sum over admitted (r, j) of a_{r,j} tokens,
where a_{r,j} = c_{r,1} * ... * c_{r,j} is the survival of request r's first j drafts
(c: conditional acceptance, the confidence head's output). The step runs at SPS steps per
second, which falls as the verify batch grows; the throughput to maximise is tau * SPS.

Two planners, one objective:

- `schedule_prefix`: the paper's Algorithm 1 for a verify whose cost depends on the tokens
  in the batch (a flattened batch: B = sum of (l_r + 1)). Candidates (r, j) are admitted in
  descending survival; with `early_break` it stops at the first admission that does not
  raise tau * SPS. That break is what makes it lossless when the confidences are the
  current step's: c_{r,k+1} depends on the sampled draft x_{r,k}, and a search that looks
  past the first non-improvement would let x_{r,k} decide whether x_{r,k} is verified
  (Appendix A: target (0.7, 0.3) becomes (0.85, 0.15)). Without the break it returns the
  global maximum along the admission path, which is lossless only for confidences fixed
  before the step's drafts were sampled (§5.2: the asynchronous scheduler).
- `best_depth`: this engine's verify is padded, [R, depth + 1] tokens whatever each row
  verifies, so its cost depends on (R, depth) only and a row verifying fewer than `depth`
  drafts saves nothing. The exact optimum is then a scan over depths. The engine plans from
  what the host already holds when it launches a step (the confidences and acceptances of
  steps already read, one or two steps old under overlap), which the step's own drafts
  cannot influence, so the plan is lossless by construction and the scan needs no break.

Both take SPS as a function `steps_per_second(num_requests, num_tokens, depth)` so the
same measured curve serves either layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

StepsPerSecond = Callable[[int, int, int], float]


def survival(conditional: Sequence[float]) -> list[float]:
    """a_j = c_1 * ... * c_j: the probability that the first j drafts are all accepted."""
    out, a = [], 1.0
    for c in conditional:
        a *= c
        out.append(a)
    return out


def schedule_prefix(confidences: Sequence[Sequence[float]], steps_per_second: StepsPerSecond,
                    early_break: bool = True) -> list[int]:
    """Algorithm 1: per-request verify lengths l*_r for conditional acceptances c_{r,1..K}.

    Starts from l = 0 everywhere (tau = R, every request commits its bonus token, B = R),
    then admits (r, j) in descending a_{r,j}, ties broken by j (so (r, j) always comes after
    (r, j - 1) and the admitted set stays a prefix per request), then by r. Each admission
    adds a_{r,j} to tau and one token to B; the lengths with the best tau * SPS seen so far
    are kept. `early_break`: stop at the first admission that does not improve it (the
    paper's rule; required when c_{r,j+1} depends on the draft x_{r,j})."""
    num_requests = len(confidences)
    lengths = [0] * num_requests
    candidates = sorted(((a, j, r) for r, c in enumerate(confidences)
                         for j, a in enumerate(survival(c), start=1) if a > 0),
                        key=lambda t: (-t[0], t[1], t[2]))
    tau, tokens, depth = float(num_requests), num_requests, 0
    best, best_lengths = tau * steps_per_second(num_requests, tokens, depth), list(lengths)
    for a, j, r in candidates:
        lengths[r] = j
        tau += a
        tokens += 1
        depth = max(depth, j)
        theta = tau * steps_per_second(num_requests, tokens, depth)
        if theta > best:
            best, best_lengths = theta, list(lengths)
        elif early_break:
            break
    return best_lengths


def best_depth(confidences: Sequence[Sequence[float]], caps: Sequence[int], depths: Sequence[int],
               steps_per_second: StepsPerSecond) -> int:
    """The depth of a padded verify step (every row drafts and verifies `depth` tokens, at
    most its cap) that maximises expected committed tokens per second. `confidences[r]`:
    predicted conditional acceptance of request r's drafts 1..; `depths`: the depths to
    choose from (those with step graphs), 0 (plain decoding, no drafting) among them.
    Ties go to the shallower depth."""
    surv = [survival(c) for c in confidences]
    num_requests = len(confidences)
    best, best_d = None, 0
    for d in sorted(depths):
        tau = num_requests + sum(sum(s[:min(d, cap)]) for s, cap in zip(surv, caps))
        theta = tau * steps_per_second(num_requests, num_requests * (d + 1), d)
        if best is None or theta > best:
            best, best_d = theta, d
    return best_d
