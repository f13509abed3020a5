"""Merged projections (models/merged.py): one weight in memory, the parts' names on disk."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_dspark.models.config import ModelConfig
from ascend_dspark.models.decoder import DecoderModel

CONFIG = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
              rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=True)


def _model(seed: int) -> DecoderModel:
    torch.manual_seed(seed)
    model = DecoderModel(ModelConfig.from_dict(CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_state_dict_speaks_the_checkpoint_names():
    names = set(_model(0).state_dict())
    layer = "model.layers.1."
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert {f"{layer}{part}.weight", f"{layer}{part}.bias"} <= names
    assert {f"{layer}mlp.gate_proj.weight", f"{layer}mlp.up_proj.weight"} <= names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)


def test_parts_are_rows_of_the_merged_weight_in_order():
    """The oracle is plain slicing of the parameter the forward multiplies by."""
    model = _model(1)
    sd = model.state_dict()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, k, v = (sd[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert q.shape == (32, 32) and k.shape == v.shape == (16, 32)
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
    assert torch.equal(attn.qkv_proj.bias[32:48], sd["model.layers.0.self_attn.k_proj.bias"])
    assert torch.equal(mlp.gate_up_proj.weight[48:], sd["model.layers.0.mlp.up_proj.weight"])


def test_round_trip_through_safetensors(tmp_path):
    """Saved parts own their storage (safetensors refuses shared tensors) and load back exactly."""
    source, target = _model(2), _model(3)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    target.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    for (name, a), b in zip(source.named_parameters(), target.parameters()):
        assert torch.equal(a, b), name


def test_a_missing_part_is_reported_by_its_checkpoint_name():
    sd = _model(4).state_dict()
    del sd["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(RuntimeError) as err:
        _model(5).load_state_dict(sd, strict=True)
    assert "model.layers.0.self_attn.qkv_proj.weight" in str(err.value)       # what is missing
    assert "model.layers.0.self_attn.q_proj.weight" in str(err.value)         # left unmerged
