"""Training samples and batch order: response-only loss masks, right-padded collation,
seeded epochs, exact resume, and rank shards that partition the one-process global batch."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ascend_dspark.training.dataset import BatchSampler, Sample, collate, load_samples


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _rec(i, prompt, response):
    return {"id": f"s:{i}", "source": "s", "prompt_ids": prompt, "response_ids": response, "finish_reason": "stop"}


def test_load_samples_masks_only_response_tokens(tmp_path, caplog):
    a = _write(tmp_path / "a.jsonl", [_rec(0, [1, 2, 3], [7, 8]), _rec(1, [4] * 6, [9, 9, 9])],
               tail='{"id": "s:cut", "prompt_ids": [1')                      # killed run's stub
    b = _write(tmp_path / "b.jsonl", [_rec(0, [5], [5]), _rec(2, [1, 2], [3, 4, 5, 6])])   # s:0 repeated
    with caplog.at_level("WARNING"):
        samples = load_samples([a, b], max_len=6)
    assert [s.id for s in samples] == ["s:0", "s:2"]          # s:1 has no response within 6 tokens
    assert "1 records with no response token" in caplog.text and "1 repeated ids" in caplog.text
    assert samples[0].input_ids.tolist() == [1, 2, 3, 7, 8]
    assert samples[0].loss_mask.tolist() == [False, False, False, True, True]
    assert samples[1].input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert samples[1].loss_mask.tolist() == [False, False, True, True, True, True]
    assert samples[0].input_ids.dtype == torch.long and samples[0].loss_mask.dtype == torch.bool
    assert [s.id for s in load_samples(str(a), 100)] == ["s:0", "s:1"]
    with pytest.raises(FileNotFoundError, match="regen"):
        load_samples(tmp_path / "missing.jsonl", 8)


def test_collate_right_pads():
    s = [Sample(torch.tensor([5, 6, 7]), torch.tensor([False, True, True])),
         Sample(torch.tensor([8]), torch.tensor([True])),
         Sample(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([False, False, True, True, True]))]
    ids, mask, lengths = collate(s)
    assert ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert mask.tolist() == [[False, True, True, False, False], [True, False, False, False, False],
                             [False, False, True, True, True]]
    assert lengths.tolist() == [3, 1, 5]
    assert (ids.dtype, mask.dtype, lengths.dtype) == (torch.long, torch.bool, torch.long)
    ids, mask, lengths = collate(s, max_len=4)
    assert ids.shape == (3, 4) and lengths.tolist() == [3, 1, 4]


def _reference_epoch(num_samples, seed, epoch):
    """Oracle: the documented order, a Python-`random` shuffle seeded by "seed:epoch"."""
    order = list(range(num_samples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def test_epochs_are_seeded_permutations():
    n, bs = 23, 4                                              # 5 full batches, 3 samples dropped per epoch
    sampler = BatchSampler(n, bs, seed=11)
    assert len(sampler) == 5
    for epoch in range(3):
        batches = [sampler.next_batch() for _ in range(5)]
        expected = _reference_epoch(n, 11, epoch)[:20]
        assert [i for b in batches for i in b] == expected
        assert all(len(b) == bs for b in batches)
    assert sampler.state_dict()["epoch"] == 2
    other = BatchSampler(n, bs, seed=12)
    assert other.next_batch() != BatchSampler(n, bs, seed=11).next_batch()


def test_resume_gives_identical_batches():
    uninterrupted = BatchSampler(50, 3, seed=0)
    want = [uninterrupted.next_batch() for _ in range(40)]    # crosses two epoch boundaries (16 per epoch)
    first = BatchSampler(50, 3, seed=0)
    got = [first.next_batch() for _ in range(16)]             # stop exactly at an epoch end
    state = json.loads(json.dumps(first.state_dict()))        # what a checkpoint stores
    second = BatchSampler(50, 3, seed=0)
    second.load_state_dict(state)
    got += [second.next_batch() for _ in range(7)]
    third = BatchSampler(50, 3, seed=0)
    third.load_state_dict(second.state_dict())                # mid-epoch
    it = iter(third)
    got += [next(it) for _ in range(17)]
    assert got == want


def test_resume_refuses_other_data_or_batching():
    state = BatchSampler(50, 3, seed=0).state_dict()
    for kwargs, what in [(dict(num_samples=51, batch_size=3, seed=0), "num_samples"),
                         (dict(num_samples=50, batch_size=4, seed=0), "batch_size"),
                         (dict(num_samples=50, batch_size=3, seed=1), "seed"),
                         (dict(num_samples=50, batch_size=3, seed=0, rank=0, world_size=2), "world_size")]:
        with pytest.raises(ValueError, match=what):
            BatchSampler(**kwargs).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        BatchSampler(5, 3, seed=0, world_size=2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_partition_the_global_batch(world_size):
    bs, n = 4, 61
    one = BatchSampler(n, bs * world_size, seed=5)             # one process reading global batches
    ranks = [BatchSampler(n, bs, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    assert len(one) == len(ranks[0])
    for _ in range(3 * len(one)):                              # three epochs
        global_batch = one.next_batch()
        shards = [s.next_batch() for s in ranks]
        assert [i for shard in shards for i in shard] == global_batch      # contiguous slices, in rank order
        assert all(len(shard) == bs for shard in shards)
        assert len(set(global_batch)) == len(global_batch)
    assert [s.state_dict() for s in ranks] == [ranks[0].state_dict()] * world_size
