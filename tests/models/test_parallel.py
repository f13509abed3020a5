"""Which weights each tensor-parallel rank keeps (models/parallel.py), in one process: the
ranks' shards put side by side are the whole model's weights, heads that do not divide are
split unevenly, and a group larger than the KV heads is refused by name. (The collectives
themselves run in tests/distributed/.)"""

from __future__ import annotations

import copy

import pytest
import torch

from ascend_dspark.distributed import TensorParallelGroup, split_sizes
from ascend_dspark.models.parallel import shard_target
from tests.helpers import tiny_target


def _shards(model, size):
    out = []
    for rank in range(size):
        shard = copy.deepcopy(model)
        shard_target(shard, TensorParallelGroup(rank, size, torch.device("cpu")))
        out.append(shard)
    return out


def test_split_sizes_are_as_even_as_possible():
    assert split_sizes(3, 2) == [2, 1]
    assert split_sizes(8, 3) == [3, 3, 2]
    assert split_sizes(4, 4) == [1, 1, 1, 1]


@pytest.mark.parametrize("size", [2, 3])
def test_shards_side_by_side_are_the_whole_model(size):
    """6 query heads over 3 KV heads (as SmolLM2's 9 over 3): at TP=2 the ranks keep 2 + 1 KV
    heads and 4 + 2 query heads, and the pieces rebuild every weight exactly."""
    model, _ = tiny_target("qwen3", torch.float32, vocab=130, num_attention_heads=6, num_key_value_heads=3,
                           intermediate_size=130)
    whole = model.state_dict()
    shards = _shards(model, size)
    kv = split_sizes(3, size)
    assert [s.num_local_kv_heads for s in shards] == kv
    for i in range(model.config.num_layers):
        pre = f"model.layers.{i}."
        parts = [s.state_dict() for s in shards]
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            key = f"{pre}{'self_attn' if name.endswith(('q_proj', 'k_proj', 'v_proj')) else 'mlp'}.{name}.weight"
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), key
        for key in (f"{pre}self_attn.o_proj.weight", f"{pre}mlp.down_proj.weight"):
            assert torch.equal(torch.cat([p[key] for p in parts], dim=1), whole[key]), key
        assert [p[f"{pre}self_attn.q_proj.weight"].shape[0] for p in parts] == [2 * n * 16 for n in kv]
    per_rank = -(-130 // size)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.cat([s.state_dict()[key] for s in shards])
        assert rows.shape[0] == per_rank * size and not rows[130:].any()      # zero padding past the vocabulary
        assert torch.equal(rows[:130], whole[key])
    assert [s.vocab_start for s in shards] == [r * per_rank for r in range(size)]


def test_a_group_larger_than_the_kv_heads_is_refused_with_the_valid_sizes():
    model, _ = tiny_target("llama", torch.float32)           # 2 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 exceeds .* 2 KV heads.*valid sizes are 1\.\.2"):
        shard_target(model, TensorParallelGroup(0, 3, torch.device("cpu")))
