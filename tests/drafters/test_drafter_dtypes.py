"""A draft in another dtype than its target: the shipped drafts run in bfloat16 over a float32
target, and the engine allocates the drafter's caches in the target's dtype.

Elsewhere the draft, the target features and the caches share one dtype, so the casts in
observe / propose (features to the draft's dtype, the stored recurrent state back to it) are
no-ops there; without them nn.Linear raises on the float32 input. The oracle: float32 features
give exactly what their bfloat16 rounding gives (the draft sees its own dtype either way).
tests/mutants/survivors.md lists the mutants these tests kill.
"""

from __future__ import annotations

import pytest
import torch
from drafter_helpers import make_target

from ascend_dspark.drafters import create_drafter
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams
from tests.helpers import cache_rows

KINDS = ["eagle3", "dflash", "dspark"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def target32():
    return make_target(torch.float32)


def run_calls(drafter, features: list[torch.Tensor], vocab: int):
    """Prefill observe, then a ragged verify-style observe (counts 1 and 3), then a proposal."""
    slots = torch.tensor([0, 1])
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab, (2, 6), generator=gen)
    step_tokens = torch.randint(0, vocab, (2, 4), generator=gen)
    drafter.allocate(2, 40, torch.float32, CPU)                 # as the engine does: the target's dtype
    drafter.reset(slots)
    lens = torch.tensor([6, 5])
    drafter.observe(slots, features[0], torch.arange(6).repeat(2, 1), tokens, lens)
    counts = torch.tensor([1, 3])
    drafter.observe(slots, features[1], lens.unsqueeze(1) + torch.arange(4), step_tokens, counts)
    anchors = step_tokens.gather(1, (counts - 1).unsqueeze(1)).squeeze(1)
    sampling = SamplingBatch([SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=11)], CPU)
    return drafter.propose(slots, anchors, lens + counts, drafter.max_draft_tokens, sampling)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_draft_over_a_float32_target(kind, target32):
    drafter = create_drafter(kind, target32, dtype=torch.bfloat16)
    assert drafter.dtype == torch.bfloat16 and next(target32.parameters()).dtype == torch.float32
    width = len(drafter.target_layer_ids) * drafter.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 6, width, generator=gen), torch.randn(2, 4, width, generator=gen)]   # float32
    got = run_calls(drafter, features, target32.config.vocab_size)
    want = run_calls(drafter, [f.to(torch.bfloat16) for f in features], target32.config.vocab_size)
    assert got.tokens.shape == (2, drafter.max_draft_tokens) and got.probs.dtype == torch.float32
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.probs, want.probs)


@pytest.mark.parametrize("kind", ["dflash", "dspark"])
def test_a_bfloat16_block_draft_stores_bfloat16_keys_in_a_float32_cache(kind, target32):
    """The context K/V a block draft writes are computed in its own dtype (rotary included,
    as the target does in its dtype): in the float32 cache the engine gives it, every stored
    key is a bfloat16 number, which a key rotated by float32 cos / sin is not."""
    drafter = create_drafter(kind, target32, dtype=torch.bfloat16)
    width = len(drafter.target_layer_ids) * drafter.config.hidden_size
    features = [torch.randn(2, 6, width, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    run_calls(drafter, [features[0], features[1][:, :4]], target32.config.vocab_size)
    cache = drafter.cache
    for slot, length in ((0, 7), (1, 8)):                  # prefill 6 + 1, 5 + 3 positions
        rows = cache_rows(cache.tables, slot)[:length]
        for k in cache.k:
            keys = k.view(-1, *k.shape[2:])[rows]
            assert keys.dtype == torch.float32 and keys.abs().sum() > 0
            assert torch.equal(keys, keys.to(torch.bfloat16).float())

