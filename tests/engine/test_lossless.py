"""T=0 losslessness: speculative output is token-identical to the target's own greedy output.

Covered for every drafter, every architecture, batch 1 and a ragged batch of 4, K in
{1, 3, 7}. Models are tiny, random and float64 (so near-ties cannot flip an argmax between
a 1-token and a (K+1)-token forward). Random drafts are mostly rejected, so a second test
wraps the real drafters in an oracle that plants the true continuation at random draft
positions: then multi-token acceptance, partial rollback and EOS inside an accepted block
are exercised too.
"""

from __future__ import annotations

import pytest
import torch

from ascend_dspark.drafters import create_drafter
from ascend_dspark.engine.engine import Engine
from ascend_dspark.engine.step_costs import StepCosts
from ascend_dspark.spec.sampling import SamplingParams
from tests.helpers import tiny_target

ARCHS = ("llama", "qwen3", "gemma3")
DRAFTERS = ("eagle3", "dflash", "dspark")
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 30, 8], [60, 61, 62, 63, 64], [12, 3, 99, 7, 1, 5, 6, 11, 100, 2, 4]]
MAX_TOKENS = 20


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module", params=ARCHS)
def arch_target(request, device):
    torch.manual_seed(0)
    ours, hf = tiny_target(request.param, dtype=torch.float64)
    return request.param, ours.to(device), hf


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' forward, recomputed on the whole sequence for every token (no cache, no EOS)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def greedy(max_tokens=MAX_TOKENS):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def references(arch_target):
    _, _, hf = arch_target
    return [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS]


def test_plain_decoding_matches_transformers(arch_target, references):
    _, target, _ = arch_target
    engine = Engine(target, None, max_model_len=64, max_batch_size=4)
    outs = engine.generate(PROMPTS, greedy())
    assert [o.token_ids for o in outs] == references
    assert all(o.stats.mean_accepted_length == 1.0 for o in outs)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("kind", DRAFTERS)
def test_speculative_greedy_is_token_identical(arch_target, references, kind, k):
    _, target, _ = arch_target
    torch.manual_seed(1)
    drafter = create_drafter(kind, target).to(torch.float64)
    engine = Engine(target, drafter, num_speculative_tokens=k, max_model_len=64, max_batch_size=4)
    assert [o.token_ids for o in engine.generate(PROMPTS[:1], greedy())] == references[:1]
    assert [o.token_ids for o in engine.generate(PROMPTS, greedy())] == references


class OracleDrafter(torch.nn.Module):
    """TEST DOUBLE around a real drafter: after the real propose(), replaces a random
    subset of draft tokens by the true greedy continuation (one-hot draft probabilities),
    so verification sees long accepted prefixes, partial rejections and full acceptance."""

    def __init__(self, inner, prompts, references, p_plant=0.8):
        super().__init__()
        self.inner = inner
        self.target_layer_ids = inner.target_layer_ids
        self.max_draft_tokens = inner.max_draft_tokens
        self.truth = {}
        self.p_plant = p_plant
        self.gen = torch.Generator().manual_seed(3)
        self.sequences = [p + r for p, r in zip(prompts, references)]

    @property
    def lookahead(self):
        return self.inner.lookahead

    def attach(self, *args):
        self.inner.attach(*args)

    def kv_bytes_per_block(self, *args):
        return self.inner.kv_bytes_per_block(*args)

    def reset(self, slot_ids):
        self.inner.reset(slot_ids)

    def observe(self, *args):
        self.inner.observe(*args)

    def propose(self, slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx=None):
        proposal = self.inner.propose(slot_ids, anchors, anchor_positions, num_tokens, sampling, ctx)
        tokens = proposal.tokens.clone()
        for b, (slot, pos) in enumerate(zip(slot_ids.tolist(), anchor_positions.tolist())):
            seq = self.sequences[slot]
            for k in range(num_tokens):
                if pos + 1 + k < len(seq) and torch.rand((), generator=self.gen) < self.p_plant:
                    tokens[b, k] = seq[pos + 1 + k]
        probs = torch.zeros_like(proposal.probs).scatter_(-1, tokens.unsqueeze(-1), 1.0)
        return type(proposal)(tokens=tokens, probs=probs, confidence=proposal.confidence)


@pytest.mark.parametrize("kind", DRAFTERS)
def test_long_accepted_prefixes_stay_identical(arch_target, references, kind):
    _, target, _ = arch_target
    torch.manual_seed(2)
    drafter = OracleDrafter(create_drafter(kind, target).to(torch.float64), PROMPTS, references)
    # The oracle double decides on the host (it reads slots and positions), which a captured
    # graph would freeze: its tests run eager steps.
    engine = Engine(target, drafter, num_speculative_tokens=7, max_model_len=64, max_batch_size=4, graphs=False,
                    speculation="fixed")
    outs = engine.generate(PROMPTS, greedy())
    assert [o.token_ids for o in outs] == references
    assert min(o.stats.mean_accepted_length for o in outs) > 1.5      # acceptance really happened


def test_stops_on_eos_inside_an_accepted_block(arch_target, references):
    _, target, _ = arch_target
    eos = references[1][6]                           # a token the target really emits mid-block
    drafter = OracleDrafter(create_drafter("dspark", target).to(torch.float64), PROMPTS[1:2], references[1:2], p_plant=1.0)
    engine = Engine(target, drafter, num_speculative_tokens=7, max_model_len=64, max_batch_size=4, graphs=False,
                    speculation="fixed")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[eos], ignore_eos=True)
    out = engine.generate(PROMPTS[1:2], params)[0]
    first = references[1].index(eos)
    assert out.token_ids == references[1][: first + 1] and out.finish_reason == "stop"


def test_max_tokens_truncates_an_accepted_block(arch_target, references):
    _, target, _ = arch_target
    drafter = OracleDrafter(create_drafter("dspark", target).to(torch.float64), PROMPTS, references, p_plant=1.0)
    engine = Engine(target, drafter, num_speculative_tokens=7, max_model_len=64, max_batch_size=4, graphs=False,
                    speculation="fixed")
    outs = engine.generate(PROMPTS, greedy(max_tokens=5))
    assert [o.token_ids for o in outs] == [r[:5] for r in references]
    assert all(o.finish_reason == "length" for o in outs)


def varying_costs(seconds=(1.0, 1.3, 1.6, 1.9, 2.5, 3.1)):
    """TEST DOUBLE of a measured step-cost table (engine/step_costs.py): deeper drafts cost
    enough that the confidence policy's depth follows the predicted acceptance."""
    return StepCosts(batch_sizes=[1, 4], depths=[0, 1, 2, 3, 5, 7], seconds=[list(seconds)] * 2, padded=False)


@pytest.mark.parametrize("kind", DRAFTERS)
def test_confidence_policy_is_token_identical(arch_target, references, kind):
    """The depth changes from step to step (planned from results already read); the output
    stays the target's greedy output."""
    _, target, _ = arch_target
    torch.manual_seed(2)
    drafter = OracleDrafter(create_drafter(kind, target).to(torch.float64), PROMPTS, references, p_plant=0.6)
    engine = Engine(target, drafter, num_speculative_tokens=7, max_model_len=64, max_batch_size=4, graphs=False,
                    speculation="confidence", step_costs=varying_costs())
    outs = engine.generate(PROMPTS, greedy())
    assert [o.token_ids for o in outs] == references
    assert sum(1 for n in engine.depth_counts[1:] if n) >= 2, engine.depth_counts


def test_confidence_policy_decodes_plainly_when_drafting_never_pays(arch_target, references):
    """Even the optimistic prior (0.8 per position) cannot repay a draft step costing 3x a
    plain one: every step runs at depth 0, and the drafter proposes nothing."""
    _, target, _ = arch_target
    drafter = OracleDrafter(create_drafter("dspark", target).to(torch.float64), PROMPTS, references, p_plant=1.0)
    engine = Engine(target, drafter, num_speculative_tokens=7, max_model_len=64, max_batch_size=4, graphs=False,
                    step_costs=varying_costs((1.0, 3.0, 3.5, 4.0, 5.0, 6.0)))
    assert engine.speculation == "confidence"                     # the default with a drafter
    outs = engine.generate(PROMPTS, greedy())
    assert [o.token_ids for o in outs] == references
    assert engine.depth_counts[1:] == [0] * 7 and engine.depth_counts[0] > 0
    assert all(set(o.stats.proposal_lengths) == {0} for o in outs)


def test_confidence_policy_respects_per_request_caps(arch_target, references):
    _, target, _ = arch_target
    drafter = OracleDrafter(create_drafter("dspark", target).to(torch.float64), PROMPTS, references, p_plant=1.0)
    engine = Engine(target, drafter, num_speculative_tokens=7, max_model_len=64, max_batch_size=4, graphs=False,
                    step_costs=varying_costs((1.0, 1.01, 1.02, 1.03, 1.04, 1.05)))
    caps = [0, 2, None, 5]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, num_speculative_tokens=c)
              for c in caps]
    outs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == references
    for cap, out in zip(caps, outs):
        assert max(out.stats.proposal_lengths) <= (7 if cap is None else cap)
    assert max(outs[2].stats.proposal_lengths) == 7             # nearly free drafting: the full depth


def test_unknown_speculation_policy_is_refused(arch_target):
    _, target, _ = arch_target
    with pytest.raises(ValueError, match="speculation policy"):
        Engine(target, create_drafter("dspark", target).to(torch.float64), speculation="sometimes")
