"""Our own drafter format: save -> load round trips, strict loading, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from drafter_helpers import SoftmaxSampling, make_target, random_features, scramble
from safetensors.torch import load_file, save_file

from ascend_dspark.drafters import create_drafter, load_drafter, save_drafter

KINDS = ["eagle3", "dflash", "dspark"]


def proposals(drafter, target):
    drafter.allocate(1, 32)
    feats = random_features(drafter, 1, 6)
    nxt = torch.randint(0, target.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    drafter.observe(torch.tensor([0]), feats, torch.arange(6).unsqueeze(0), nxt, torch.tensor([6]))
    return drafter.propose(torch.tensor([0]), nxt[:, -1], torch.tensor([6]), drafter.max_draft_tokens,
                           SoftmaxSampling(1))


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, tmp_path, target):
    drafter = scramble(create_drafter(kind, target), seed=9)
    save_drafter(drafter, tmp_path / "d")
    raw = json.loads((tmp_path / "d" / "config.json").read_text())
    assert raw["drafter"] == kind and raw["format"] == "ascend-dspark" and raw["version"] == 1
    assert raw["target_layer_ids"] == list(drafter.target_layer_ids)
    stored = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in stored)
    loaded = load_drafter(tmp_path / "d", target)
    assert type(loaded) is type(drafter) and loaded.config == drafter.config
    for (ka, va), (kb, vb) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    a, b = proposals(drafter, target), proposals(loaded, target)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    if kind == "dspark":
        assert torch.equal(a.confidence, b.confidence)


def test_load_casts_to_target_dtype(tmp_path):
    target32 = make_target(torch.float32)
    save_drafter(create_drafter("dspark", make_target()), tmp_path)        # float64 weights on disk
    assert load_drafter(tmp_path, target32).dtype == torch.float32
    assert load_drafter(tmp_path, target32, dtype=torch.float64).dtype == torch.float64


def test_non_default_options_round_trip(tmp_path, target):
    drafter = create_drafter("dspark", target, num_layers=1, block_size=4, markov_rank=8,
                             confidence_head_with_markov=False, target_layer_ids=[-1, 3])
    save_drafter(drafter, tmp_path)
    loaded = load_drafter(tmp_path, target)
    assert loaded.config == drafter.config and loaded.max_draft_tokens == 4
    assert loaded.confidence_head.proj.weight.shape == (1, 32)


def test_missing_paths(tmp_path, target):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_drafter(tmp_path / "missing_dir", target)
    save_drafter(create_drafter("dflash", target), tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_drafter(tmp_path / "d", target)


def test_strict_keys_and_shapes(tmp_path, target):
    save_drafter(create_drafter("dspark", target), tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))

    bad = dict(state)
    bad["layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 16, dtype=torch.float64)
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.o_proj\.weight.*\[32, 16\].*\[32, 32\]"):
        load_drafter(tmp_path, target)

    bad = {k: v for k, v in state.items() if k != "confidence_head.proj.bias"}
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match=r"missing tensor.*confidence_head\.proj\.bias"):
        load_drafter(tmp_path, target)

    bad = {**state, "extra.weight": torch.zeros(2)}
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match=r"unexpected tensor.*extra\.weight"):
        load_drafter(tmp_path, target)


def test_config_errors(tmp_path, target):
    save_drafter(create_drafter("dspark", target), tmp_path)
    cfg_path = tmp_path / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_drafter(tmp_path, target)
    cfg_path.write_text(json.dumps({**raw, "hidden_size": 48}))
    with pytest.raises(ValueError, match="hidden_size 48 != target hidden_size 32"):
        load_drafter(tmp_path, target)
    cfg_path.write_text(json.dumps({**raw, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        load_drafter(tmp_path, target)
    cfg_path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an ascend-dspark drafter config"):
        load_drafter(tmp_path, target)


def shard_tensor_bytes(path) -> dict[str, int]:
    """Tensor bytes per shard file, from the index's weight map."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, int] = {}
    for file in sorted(set(index["weight_map"].values())):
        out[file] = sum(t.numel() * t.element_size() for t in load_file(str(path / file)).values())
    return out


def test_sharded_round_trip(tmp_path, target):
    """With max_shard_bytes, the weights go into HF-style shards under that size (a tensor
    bigger than the limit alone in its shard) and load back to the same drafter."""
    drafter = scramble(create_drafter("dspark", target), seed=9)
    limit = 40_000                                   # markov_w1 / markov_w2 (96 x 64 float64) are bigger
    save_drafter(drafter, tmp_path, max_shard_bytes=limit)
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(drafter.state_dict())
    state = drafter.state_dict()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    sizes = shard_tensor_bytes(tmp_path)
    n = len(sizes)
    assert n > 2 and sorted(sizes) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for file, size in sizes.items():
        names = [k for k, f in index["weight_map"].items() if f == file]
        assert size <= limit or len(names) == 1, (file, size, names)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(sizes)

    loaded = load_drafter(tmp_path, target)
    assert type(loaded) is type(drafter) and loaded.config == drafter.config
    for (ka, va), (kb, vb) in zip(state.items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    a, b = proposals(drafter, target), proposals(loaded, target)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs) and torch.equal(a.confidence, b.confidence)


def test_resaving_leaves_one_weight_layout(tmp_path, target):
    """A save replaces the weight files of an earlier save in either layout (a stale
    model.safetensors would otherwise shadow new shards)."""
    first = scramble(create_drafter("dflash", target), seed=1)
    second = scramble(create_drafter("dflash", target), seed=2)
    save_drafter(first, tmp_path)
    save_drafter(second, tmp_path, max_shard_bytes=10_000)
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(load_drafter(tmp_path, target).fc.weight, second.fc.weight)
    save_drafter(first, tmp_path)
    assert [p.name for p in tmp_path.glob("model*")] == ["model.safetensors"]
    assert torch.equal(load_drafter(tmp_path, target).fc.weight, first.fc.weight)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_drafter(first, tmp_path, max_shard_bytes=0)
