"""Offline target-feature cache: contents equal a per-sample forward through the target,
resumable writing, checksum verification, and refusal of a cache made for another target
or other layer ids."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ascend_dspark.training.dataset import Sample
from ascend_dspark.training.feature_cache import (FeatureCache, compute_target_outputs, target_identity,
                                                  write_feature_cache)
from tests.helpers import new_cache, run_batch, tiny_target

LAYERS = (0, 2)


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", torch.float64, seed=0)[0]


@pytest.fixture(scope="module")
def samples():
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate([5, 9, 3, 12, 7, 4, 8]):
        ids = torch.randint(5, 128, (n,), generator=gen)
        mask = torch.arange(n) >= n // 2
        out.append(Sample(ids, mask, f"s:{i}"))
    return out


def _alone(target, sample):
    """Oracle: the sample alone through the decoder (tests/helpers run_batch), no padding."""
    cache = new_cache(target, 1, len(sample) + 1)
    logits, feats, _ = run_batch(target, cache, [sample.input_ids.tolist()], [0], capture_layers=LAYERS)
    return feats[0], logits[0]


def test_compute_target_outputs_on_a_padded_batch(target, samples):
    rows = samples[:3]
    lengths = torch.tensor([len(s) for s in rows])
    ids = torch.zeros(3, int(lengths.max()), dtype=torch.long)
    for b, s in enumerate(rows):
        ids[b, : len(s)] = s.input_ids
    feats, hidden = compute_target_outputs(target, ids, lengths, LAYERS)
    assert feats.shape == (3, 9, 2 * 64) and hidden.shape == (3, 9, 64)
    assert not feats.requires_grad and not torch.is_inference(feats)      # usable as a training input
    for b, s in enumerate(rows):
        want_feats, want_logits = _alone(target, s)
        n = len(s)
        torch.testing.assert_close(feats[b, :n], want_feats, rtol=0, atol=1e-10)
        torch.testing.assert_close(target.logits(hidden[b, :n]), want_logits, rtol=0, atol=1e-9)


def test_cache_round_trip_and_resume(target, samples, tmp_path):
    written = write_feature_cache(target, samples, tmp_path, LAYERS, samples_per_shard=3, batch_size=2,
                                  progress=False)
    assert written == [0, 1, 2]
    cache = FeatureCache(tmp_path, target, LAYERS)
    assert len(cache) == 3 and cache.complete and cache.locate("s:4") == (1, 1)
    got = [c for k in range(len(cache)) for c in cache.read(k)]
    assert [c.id for c in got] == [s.id for s in samples]
    for c, s in zip(got, samples):
        want_feats, want_logits = _alone(target, s)
        assert torch.equal(c.input_ids, s.input_ids)
        assert c.features.dtype == torch.float64
        torch.testing.assert_close(c.features, want_feats, rtol=0, atol=1e-10)
        torch.testing.assert_close(target.logits(c.last_hidden), want_logits, rtol=0, atol=1e-9)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"][1]["sample_ids"] == ["s:3", "s:4", "s:5"]
    assert manifest["shards"][1]["shapes"]["features"] == [12 + 7 + 4, 128]

    # Resume: verified shards are skipped; a deleted shard is rewritten, byte-identical.
    before = (tmp_path / "shard-00001.safetensors").read_bytes()
    stamp = os.stat(tmp_path / "shard-00000.safetensors").st_mtime_ns
    (tmp_path / "shard-00001.safetensors").unlink()
    assert write_feature_cache(target, samples, tmp_path, LAYERS, samples_per_shard=3, batch_size=2,
                               progress=False) == [1]
    assert (tmp_path / "shard-00001.safetensors").read_bytes() == before
    assert os.stat(tmp_path / "shard-00000.safetensors").st_mtime_ns == stamp


def test_interrupted_writer_finishes_later(target, samples, tmp_path, monkeypatch):
    import ascend_dspark.training.feature_cache as fc

    calls = []

    def dying(*args):
        calls.append(1)
        if len(calls) > 2:                       # shard 0 takes two batches; die in shard 1
            raise KeyboardInterrupt
        return compute_target_outputs(*args)

    monkeypatch.setattr(fc, "compute_target_outputs", dying)
    with pytest.raises(KeyboardInterrupt):
        write_feature_cache(target, samples, tmp_path, LAYERS, samples_per_shard=3, batch_size=2, progress=False)
    monkeypatch.undo()
    partial = FeatureCache(tmp_path)
    assert partial.shards[0] is not None and not partial.complete
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: shard 1 was never written"):
        partial.read(1)
    assert not list(tmp_path.glob("*.tmp"))
    assert write_feature_cache(target, samples, tmp_path, LAYERS, samples_per_shard=3, progress=False) == [1, 2]
    assert FeatureCache(tmp_path, target, LAYERS).complete


def test_corrupt_shard_is_named(target, samples, tmp_path):
    write_feature_cache(target, samples, tmp_path, LAYERS, samples_per_shard=4, progress=False)
    path = tmp_path / "shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01                           # one bit inside the feature data
    path.write_bytes(bytes(data))
    cache = FeatureCache(tmp_path, target, LAYERS)
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: corrupt shard, sha256"):
        cache.read(0)
    cache.read(1)                                          # the other shard is fine
    # The writer notices it too and rewrites only that shard.
    assert write_feature_cache(target, samples, tmp_path, LAYERS, samples_per_shard=4, progress=False) == [0]
    FeatureCache(tmp_path).read(0)


def test_cache_for_another_target_or_layers_is_refused(target, samples, tmp_path):
    write_feature_cache(target, samples[:2], tmp_path, LAYERS, progress=False)
    other = tiny_target("qwen3", torch.float64, seed=1)[0]                  # same config, other weights
    with pytest.raises(ValueError, match=r"manifest.json: cache was made for another target.*target weights"):
        FeatureCache(tmp_path, other, LAYERS)
    with pytest.raises(ValueError, match=r"layer ids: cache has \[0, 2\], expected \[1, 2\]"):
        FeatureCache(tmp_path, target, (1, 2))
    with pytest.raises(ValueError, match=r"layer ids"):
        FeatureCache(tmp_path, layer_ids=(2, 0))                            # order matters (concatenation)
    bigger = tiny_target("qwen3", torch.float64, seed=0, num_layers=5)[0]
    with pytest.raises(ValueError, match=r"layers: cache has 4, expected 5; target config"):
        FeatureCache(tmp_path, bigger, LAYERS)
    with pytest.raises(ValueError, match=r"manifest.json: this cache was made for another target"):
        write_feature_cache(other, samples[:2], tmp_path, LAYERS, progress=False)
    with pytest.raises(ValueError, match=r"dtype: cache has float64, expected bfloat16"):
        FeatureCache(tmp_path, target, LAYERS, dtype=torch.bfloat16)
    # Same weights in another precision are the same target (the probe rounds to bf16).
    fp32 = tiny_target("qwen3", torch.float32, seed=0)[0]
    assert target_identity(fp32, LAYERS, torch.float64) == target_identity(target, LAYERS, torch.float64)


def test_bf16_storage(target, samples, tmp_path):
    write_feature_cache(target, samples[:3], tmp_path, LAYERS, dtype=torch.bfloat16, progress=False)
    got = FeatureCache(tmp_path, target, LAYERS, dtype=torch.bfloat16).read(0)
    want, _ = _alone(target, samples[1])
    assert got[1].features.dtype == torch.bfloat16
    torch.testing.assert_close(got[1].features.double(), want, rtol=1e-2, atol=1e-2)
