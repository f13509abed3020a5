"""Compact training data: uint16 shards round-trip the records, stay under the size limit,
refuse ids that do not fit, append only what is new, and load like the JSONL they came from."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ascend_dspark.training.dataset import load_samples
from ascend_dspark.training.shards import pack, read_shard, shard_paths, write_shards


def _records(n, seed=0, vocab=49152, samples=2):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        for k in range(samples):
            out.append({"id": f"p:{i}#{k}", "prompt_id": f"p:{i}", "sample": k, "source": "src", "prompt": f"Q {i}?",
                        "seed": rng.getrandbits(63), "finish_reason": rng.choice(["stop", "length"]),
                        "prompt_ids": [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))],
                        "response_ids": [rng.randrange(vocab) for _ in range(rng.randrange(1, 200))]})
    return out


def test_round_trip(tmp_path):
    recs = _records(40)
    recs[0]["response_ids"][0] = 65535                  # the largest id uint16 holds
    files = write_shards(recs, tmp_path)
    assert [p.name for p in files] == ["data-00000.npz"]
    z = read_shard(files[0])
    assert z["tokens"].dtype == np.uint16
    assert z["tokens"].size == sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in recs)
    samples = load_samples([tmp_path], max_len=10_000)
    assert [s.id for s in samples] == [r["id"] for r in recs]
    for s, r in zip(samples, recs):
        assert s.input_ids.tolist() == r["prompt_ids"] + r["response_ids"]
        assert s.loss_mask.tolist() == [False] * len(r["prompt_ids"]) + [True] * len(r["response_ids"])
        assert s.prompt_id == r["prompt_id"]
    # The same data read from the JSONL gives the same samples, prompt keys included.
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    from_jsonl = load_samples([jsonl], 10_000)
    assert all(torch.equal(a.input_ids, b.input_ids) and a.prompt_key == b.prompt_key and a.prompt_key
               for a, b in zip(samples, from_jsonl))
    assert len({s.prompt_key for s in samples}) == 40               # one key per prompt text


def test_size_limit_splits_and_appends(tmp_path):
    recs = _records(60, seed=1)
    limit = 8_000                                        # bytes: forces several shards
    files = write_shards(recs, tmp_path, max_bytes=limit)
    assert len(files) > 2 and all(p.stat().st_size < limit for p in files)
    assert [p.name for p in files] == [f"data-{i:05d}.npz" for i in range(len(files))]
    assert [s.id for s in load_samples([tmp_path], 10_000)] == [r["id"] for r in recs]
    more = _records(70, seed=1)[-20:]                    # 10 new prompts' records ...
    again = write_shards(recs[:5] + more, tmp_path, max_bytes=limit)    # ... and 5 already packed
    assert [p.name for p in again][0] == f"data-{len(files):05d}.npz"
    ids = [s.id for s in load_samples(shard_paths(tmp_path), 10_000)]
    assert ids == [r["id"] for r in recs + more]


def test_ids_that_do_not_fit_uint16_are_refused(tmp_path):
    rec = _records(1, samples=1)[0]
    rec["response_ids"][-1] = 65536
    with pytest.raises(ValueError, match="uint16"):
        write_shards([rec], tmp_path)
    assert not shard_paths(tmp_path)


def test_pack_from_jsonl(tmp_path):
    recs = _records(10, seed=2)
    jsonl = tmp_path / "regen.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = pack([jsonl], tmp_path / "shards")
    assert summary["records"] == 20 and summary["files"] == 1
    # ~2 bytes a token before compression, far below the JSONL's decimal text
    assert summary["bytes"] < jsonl.stat().st_size / 2
    assert pack([jsonl], tmp_path / "shards")["new_files"] == []
