"""Seeds and noise positions through the engine, pinned by a reference loop written here.

A seeded request must draw the same numbers whatever its neighbours do, including when
neighbours finish earlier and the batch shrinks (rows are re-selected every step). And
every draw has a fixed key (seed, absolute position, stream): the first token at prefill
uses TARGET noise at its position; draft k of a step anchored at a uses DRAFT noise at
a + 1 + k; its acceptance coin ACCEPT noise at a + 1 + k; the residual or bonus at stop
index s uses TARGET noise at a + 1 + s. The reference loop below re-implements speculative
sampling one request at a time, from the definitions, with exactly those keys, and must
reproduce the engine token for token, for four neighbours with different seeds,
temperatures and max_tokens (the batch shrinks three times). A reference keyed one
position off, or on another stream, must not (the pin is sharp).
"""

from __future__ import annotations

import pytest
import torch
from engine_doubles import make_target, one_thread  # noqa: F401  (autouse: single-threaded)

import ops
from ascend_dspark.drafters.base import DraftProposal
from ascend_dspark.engine.engine import Engine
from ascend_dspark.cache import PagedKVCache
from ascend_dspark.spec.sampling import SamplingParams, Stream

BOS = 1
PROMPTS = [[BOS, 17, 3], [BOS, 44, 2, 7, 30, 8], [BOS, 61, 62, 63], [BOS, 3, 99, 7, 1]]
PARAMS = [SamplingParams(temperature=t, seed=s, max_tokens=m, ignore_eos=True)
          for t, s, m in [(1.0, 11, 13), (0.7, 2**40 + 5, 2), (1.3, 7, 11), (1.0, 12, 6)]]
MIX = 0.7


@pytest.fixture(scope="module")
def target():
    return make_target()


def target_logits(target, seq: list[int]) -> torch.Tensor:
    """float32 logits [len(seq), V] of one plain forward over the whole sequence."""
    cfg = target.config
    cache = PagedKVCache.contiguous(cfg.num_layers, 1, len(seq), cfg.num_kv_heads, cfg.head_dim, torch.float64, torch.device("cpu"))
    ids = torch.tensor([seq])
    with torch.inference_mode():
        out = target(ids, torch.arange(len(seq)).unsqueeze(0), cache, torch.zeros(1, dtype=torch.long),
                     torch.ones_like(ids, dtype=torch.bool))
        return target.logits(out.hidden[0])


def draft_law(target, context: list[int]) -> torch.Tensor:
    """The double's q after `context`: MIX x the target's softmax + (1 - MIX) x uniform."""
    p = torch.softmax(target_logits(target, context)[-1], -1)
    return MIX * p + (1 - MIX) / p.numel()


def race(weights: torch.Tensor, seed: int, position: int, stream: Stream) -> int:
    """One draw from weights, keyed by (seed, position, stream): the noise definition."""
    noise = ops.counter_uniform_vocab(torch.tensor([seed]), torch.tensor([position]), int(stream), weights.numel())
    return int(ops.exponential_race(weights.unsqueeze(0), noise)[0])


def coin(seed: int, position: int) -> float:
    return float(ops.counter_uniform(torch.tensor([seed]), torch.tensor([position]), int(Stream.ACCEPT))[0])


class ContextDrafter:
    """TEST DOUBLE (duck-typed, keeps no cache): drafts from draft_law(told context), with
    DRAFT noise at the draft's position, chaining on its own drafts. It knows the committed
    sequence only from what observe() told it (position 0 is always BOS)."""

    target_layer_ids = ()

    def __init__(self, target, k: int) -> None:
        self.target, self.max_draft_tokens = target, k
        self.told: dict[int, dict[int, int]] = {}

    lookahead = 0

    def attach(self, tables, dtype=None):
        pass

    def reset(self, slot_ids):
        for s in slot_ids.tolist():
            self.told[s] = {0: BOS}

    def observe(self, slot_ids, features, positions, next_tokens, counts, ctx=None):
        for b, s in enumerate(slot_ids.tolist()):
            for i in range(int(counts[b])):
                self.told[s][int(positions[b, i]) + 1] = int(next_tokens[b, i])

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        tokens = torch.zeros(len(slot_ids), num_tokens, dtype=torch.long)
        probs = torch.zeros(len(slot_ids), num_tokens, self.target.config.vocab_size)
        for b, s in enumerate(slot_ids.tolist()):
            a = int(anchor_positions[b])
            context = [self.told[s][p] for p in range(a + 1)]
            for k in range(num_tokens):
                q = draft_law(self.target, context)
                tokens[b, k] = race(q, int(sampling.seeds[b]), a + 1 + k, Stream.DRAFT)
                probs[b, k] = q
                context.append(int(tokens[b, k]))
        return DraftProposal(tokens=tokens, probs=probs)


def reference_generate(target, prompt, params: SamplingParams, k: int, shift: int = 0,
                       residual_stream: Stream = Stream.TARGET) -> list[int]:
    """Speculative sampling for one request, written from the definitions (T only, no
    filters), with the noise keys stated in the module docstring. `shift` / `residual_stream`
    move the residual / bonus key, for the sharpness check."""
    seed, t = params.seed, params.temperature
    seq = list(prompt)

    def p_at(context):
        return torch.softmax(target_logits(target, context)[-1] / t, -1)

    seq.append(race(p_at(seq), seed, len(seq), Stream.TARGET))              # prefill's first token
    while len(seq) - len(prompt) < params.max_tokens:
        a = len(seq) - 1                                                     # the anchor's position
        drafts, qs, context = [], [], list(seq)
        for j in range(k):
            q = draft_law(target, context)
            drafts.append(race(q, seed, a + 1 + j, Stream.DRAFT))
            qs.append(q)
            context.append(drafts[-1])
        new = []
        for j in range(k + 1):
            p = p_at(seq + new)
            if j == k:                                                       # all accepted: bonus from p
                new.append(race(p, seed, a + 1 + j + shift, residual_stream))
                break
            x, q = drafts[j], qs[j]
            if coin(seed, a + 1 + j) < min(1.0, float(p[x] / q[x])):
                new.append(x)
                continue
            r = (p - q).clamp_min(0)
            new.append(race(r if r.sum() > 1e-8 else p, seed, a + 1 + j + shift, residual_stream))
            break
        seq += new
    return seq[len(prompt):len(prompt) + params.max_tokens]


@pytest.mark.parametrize("k", [1, 3])
def test_engine_matches_the_reference_loop_while_the_batch_shrinks(target, k):
    engine = Engine(target, ContextDrafter(target, k), num_speculative_tokens=k, max_model_len=64, max_batch_size=4)
    outs = engine.generate(PROMPTS, PARAMS)
    expected = [reference_generate(target, p, prm, k) for p, prm in zip(PROMPTS, PARAMS)]
    assert [o.token_ids for o in outs] == expected
    # The paths the keys govern all ran: accepted drafts, rejections, bonus tokens.
    lengths = [n for o in outs for n in o.stats.accepted_lengths]
    assert 1 in lengths and k + 1 in lengths
    # ... and the pin is sharp: the residual / bonus keyed one position later, or on the
    # DRAFT stream, gives other tokens.
    shifted = [reference_generate(target, p, prm, k, shift=1) for p, prm in zip(PROMPTS, PARAMS)]
    other_stream = [reference_generate(target, p, prm, k, residual_stream=Stream.DRAFT)
                    for p, prm in zip(PROMPTS, PARAMS)]
    assert shifted != expected and other_stream != expected


def test_neighbours_finishing_early_keep_their_own_seeds(target):
    """Each request gives in the shrinking batch exactly what it gives alone, and other
    seeds give other tokens (so equality is not an accident of the drafter)."""
    k = 3
    engine = Engine(target, ContextDrafter(target, k), num_speculative_tokens=k, max_model_len=64, max_batch_size=4)
    together = [o.token_ids for o in engine.generate(PROMPTS, PARAMS)]
    alone = [engine.generate([p], prm)[0].token_ids for p, prm in zip(PROMPTS, PARAMS)]
    assert together == alone
    reseeded = [SamplingParams(**{**prm.__dict__, "seed": prm.seed + 1}) for prm in PARAMS]
    assert [o.token_ids for o in engine.generate(PROMPTS, reseeded)] != together
