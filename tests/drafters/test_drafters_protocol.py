"""The Drafter protocol for all three kinds: shapes, greedy, caches, validation, random init."""

from __future__ import annotations

import pytest
import torch
from drafter_helpers import SoftmaxSampling, greedy, make_target, prefill_features, random_features, scramble

from ascend_dspark.drafters import DFlashDrafter, DSparkDrafter, Eagle3Drafter, create_drafter
from ascend_dspark.drafters.build import default_layer_ids

KINDS = ["eagle3", "dflash", "dspark"]


def observed(kind, target, batch=2, length=6, counts=None, seed=0, **overrides):
    drafter = scramble(create_drafter(kind, target, **overrides), seed)
    drafter.allocate(batch + 1, 40)
    counts = torch.tensor(counts or [length] * batch)
    slots = torch.arange(batch) + 1
    feats = random_features(drafter, batch, length)
    positions = torch.arange(length).repeat(batch, 1)
    nxt = torch.randint(0, target.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(5))
    drafter.observe(slots, feats, positions, nxt, counts)
    anchors = nxt.gather(1, (counts - 1).unsqueeze(1)).squeeze(1)
    return drafter, slots, anchors, counts


def test_defaults(target):
    e, f, s = (create_drafter(k, target) for k in KINDS)
    assert isinstance(e, Eagle3Drafter) and isinstance(f, DFlashDrafter) and isinstance(s, DSparkDrafter)
    assert e.config.num_layers == 1 and e.max_draft_tokens == 7
    assert f.config.num_layers == 2 and f.config.block_size == 8 and not f.config.anchor_first
    assert f.max_draft_tokens == 7
    assert s.config.num_layers == 2 and s.config.block_size == 7 and s.config.anchor_first and s.max_draft_tokens == 7
    assert s.config.markov_rank == 64 and s.config.confidence_head
    assert f.config.mask_token_id == s.config.mask_token_id == target.config.vocab_size - 1
    assert e.target_layer_ids == (1, 2, 2)                     # [1, L//2-1, L-4] for L = 6
    assert default_layer_ids("eagle3", 32, 1) == [1, 15, 28]
    assert default_layer_ids("dspark", 36, 5) == [1, 9, 17, 25, 33]
    assert all(d.dtype == torch.float64 for d in (e, f, s))


def test_target_is_shared_not_owned(target):
    for kind in KINDS:
        drafter = create_drafter(kind, target)
        assert drafter.target is target
        names = set(drafter.state_dict())
        assert not any(n.startswith(("target", "model.", "embed_tokens", "lm_head")) for n in names)
        target_ids = {id(p) for p in target.parameters()}
        assert not any(id(p) in target_ids for p in drafter.parameters())


def test_seeded_init_is_reproducible(target):
    a, b = create_drafter("dspark", target, seed=3), create_drafter("dspark", target, seed=3)
    c = create_drafter("dspark", target, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert 0.015 < a.fc.weight.std().item() < 0.025
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_proposal_is_argmax_of_one_hot(kind, target):
    drafter, slots, anchors, counts = observed(kind, target)
    prop = drafter.propose(slots, anchors, counts, drafter.max_draft_tokens, greedy(2))
    b, k, v = 2, drafter.max_draft_tokens, target.config.vocab_size
    assert prop.tokens.shape == (b, k) and prop.tokens.dtype == torch.long
    assert prop.probs.shape == (b, k, v) and prop.probs.dtype == torch.float32
    assert torch.equal(prop.probs.sum(-1), torch.ones(b, k))
    assert torch.equal(prop.probs.amax(-1), torch.ones(b, k))
    assert torch.equal(prop.probs.argmax(-1), prop.tokens)
    if kind == "dspark":
        assert prop.confidence.shape == (b, k) and prop.confidence.dtype == torch.float32
        assert bool(((prop.confidence > 0) & (prop.confidence < 1)).all())
    else:
        assert prop.confidence is None


@pytest.mark.parametrize("kind", KINDS)
def test_propose_leaves_cache_alone(kind, target):
    drafter, slots, anchors, counts = observed(kind, target, counts=[6, 4])
    lengths = drafter.cache.lengths.clone()
    assert lengths.tolist() == [0, 6, 4]
    sampling = SoftmaxSampling(2)
    a = drafter.propose(slots, anchors, counts, drafter.max_draft_tokens, sampling)
    assert torch.equal(drafter.cache.lengths, lengths)
    b = drafter.propose(slots, anchors, counts, drafter.max_draft_tokens, sampling)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    if kind == "dspark":
        assert torch.equal(a.confidence, b.confidence)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_are_independent(kind, target):
    """A ragged batch gives each request what it would get alone (padding is inert)."""
    drafter, slots, anchors, counts = observed(kind, target, counts=[6, 3])
    both = drafter.propose(slots, anchors, counts, drafter.max_draft_tokens, SoftmaxSampling(2))
    alone, s1, a1, c1 = observed(kind, target, batch=1, length=3)
    # Same features / tokens for the shorter request: rebuild them exactly.
    feats = random_features(drafter, 2, 6)[1:, :3]
    nxt = torch.randint(0, target.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))[1:, :3]
    alone.reset(s1)
    alone.observe(s1, feats, torch.arange(3).unsqueeze(0), nxt, torch.tensor([3]))
    sampling = SoftmaxSampling(1, seed=8)                         # row 1 of the batch had seed 7 + 1
    one = alone.propose(s1, nxt[:, -1], torch.tensor([3]), drafter.max_draft_tokens, sampling)
    assert torch.equal(one.tokens[0], both.tokens[1])
    torch.testing.assert_close(one.probs[0], both.probs[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_tokens_is_a_prefix(kind, target):
    drafter, slots, anchors, counts = observed(kind, target)
    full = drafter.propose(slots, anchors, counts, drafter.max_draft_tokens, greedy(2))
    for n in range(drafter.max_draft_tokens):          # every K the engine may ask for, and 0
        part = drafter.propose(slots, anchors, counts, n, greedy(2))
        assert part.tokens.shape == (2, n) and part.probs.shape == (2, n, target.config.vocab_size)
        assert torch.equal(part.tokens, full.tokens[:, :n])


@pytest.mark.parametrize("kind", KINDS)
def test_too_many_tokens(kind, target):
    drafter, slots, anchors, counts = observed(kind, target)
    with pytest.raises(ValueError, match="max_draft_tokens"):
        drafter.propose(slots, anchors, counts, drafter.max_draft_tokens + 1, greedy(2))


def test_allocate_first(target):
    drafter = create_drafter("dspark", target)
    with pytest.raises(RuntimeError, match="allocate"):
        drafter.observe(torch.tensor([0]), torch.zeros(1, 1, 96), torch.zeros(1, 1, dtype=torch.long),
                        torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]))


def test_feature_width_checked(target):
    drafter = create_drafter("dspark", target)
    drafter.allocate(1, 16)
    with pytest.raises(ValueError, match="width 64.*3 target layers x hidden 32 = 96"):
        drafter.observe(torch.tensor([0]), torch.zeros(1, 2, 64, dtype=torch.float64),
                        torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]))


def test_validation_errors(target):
    with pytest.raises(ValueError, match="hidden_size 48 != target hidden_size 32"):
        create_drafter("dspark", target, hidden_size=48)
    with pytest.raises(ValueError, match="vocab_size 90 != target vocab_size 96"):
        create_drafter("eagle3", target, vocab_size=90)
    with pytest.raises(ValueError, match="last target layer"):
        create_drafter("dflash", target, target_layer_ids=[1, 5])
    with pytest.raises(ValueError, match="out of range"):
        create_drafter("dflash", target, target_layer_ids=[1, 9])
    with pytest.raises(ValueError, match="out of range"):
        create_drafter("eagle3", target, target_layer_ids=[-2, 1])
    with pytest.raises(ValueError, match="mask_token_id 96"):
        create_drafter("dspark", target, mask_token_id=96)
    with pytest.raises(ValueError, match="anchor-first"):
        create_drafter("dspark", target, anchor_first=False)
    with pytest.raises(ValueError, match="exactly one decoder layer"):
        create_drafter("eagle3", target, num_layers=2)
    with pytest.raises(TypeError, match="blocksize"):
        create_drafter("dspark", target, blocksize=3)
    with pytest.raises(ValueError, match="unknown drafter kind"):
        create_drafter("medusa", target)


def test_embedding_output_layer_allowed(target):
    drafter = create_drafter("dspark", target, target_layer_ids=[-1, 2])
    assert drafter.fc.weight.shape == (32, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_end_to_end_with_real_target_features(kind):
    """Prefill through the real target, observe its features, propose; float32 target."""
    target = make_target(torch.float32)
    drafter = create_drafter(kind, target)
    assert drafter.dtype == torch.float32
    prompt = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    feats = prefill_features(target, prompt, drafter.target_layer_ids)
    first = torch.tensor([[11]])
    drafter.allocate(1, 32)
    nxt = torch.cat([prompt[:, 1:], first], 1)
    drafter.observe(torch.tensor([0]), feats, torch.arange(9).unsqueeze(0), nxt, torch.tensor([9]))
    prop = drafter.propose(torch.tensor([0]), first[:, 0], torch.tensor([9]), 4, greedy(1))
    assert prop.tokens.shape == (1, 4)
    # After a verification that accepted two drafts: observe anchor + 2 accepted, next = 2 accepted + bonus.
    committed = torch.cat([first[0], prop.tokens[0, :2], torch.tensor([5])])
    drafter.observe(torch.tensor([0]), torch.randn(1, 3, feats.shape[-1]), torch.arange(9, 12).unsqueeze(0),
                    committed[1:].unsqueeze(0), torch.tensor([3]))
    assert drafter.cache.lengths.tolist() == [12]
    again = drafter.propose(torch.tensor([0]), torch.tensor([5]), torch.tensor([12]), 4, greedy(1))
    assert again.tokens.shape == (1, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_real_sampling_batch_mixed(kind, target):
    """Greedy and seeded top-k rows in one batch; drafts use Stream.DRAFT at their absolute positions."""
    from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams, Stream, exponential_race

    drafter, slots, anchors, counts = observed(kind, target, counts=[6, 5])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=10, seed=123)]
    k = drafter.max_draft_tokens
    a = drafter.propose(slots, anchors, counts, k, SamplingBatch(params, torch.device("cpu")))
    b = drafter.propose(slots, anchors, counts, k, SamplingBatch(params, torch.device("cpu")))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    assert torch.equal(a.probs[0].argmax(-1), a.tokens[0]) and torch.equal(a.probs[0].amax(-1), torch.ones(k))
    assert bool(((a.probs[1] > 0).sum(-1) <= 10).all())
    torch.testing.assert_close(a.probs[1].sum(-1), torch.ones(k))
    assert bool((a.probs[1].gather(-1, a.tokens[1:2].T) > 0).all())
    positions = counts[1] + 1 + torch.arange(k)
    seeds = torch.tensor([123])
    expected = exponential_race(a.probs[1:], seeds, positions.unsqueeze(0), Stream.DRAFT)
    assert torch.equal(expected[0], a.tokens[1])


def test_llama_target():
    """Llama-style target (no q/k norm): Eagle3 follows it; block drafters keep Qwen3-style q/k norms."""
    import transformers
    from ascend_dspark.models.config import ModelConfig
    from ascend_dspark.models.decoder import DecoderModel

    cfg = transformers.LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0).to_dict()
    target = scramble(DecoderModel(ModelConfig.from_dict(cfg)), 1).double()
    eagle = create_drafter("eagle3", target)
    assert not hasattr(eagle.layers[0].self_attn, "q_norm") and len(eagle.state_dict()) == 12
    assert eagle.target_layer_ids == (1, 3, 4) and eagle.lookahead == 6
    for kind in KINDS:
        drafter, slots, anchors, counts = observed(kind, target)
        prop = drafter.propose(slots, anchors, counts, drafter.max_draft_tokens, greedy(2))
        assert prop.tokens.shape == (2, drafter.max_draft_tokens)
        assert int(prop.tokens.max()) < 80
