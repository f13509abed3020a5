"""DeepSpec exports (Qwen3DSparkModel / Qwen3Eagle3Model): names, shapes, strictness, numbers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from drafter_helpers import SoftmaxSampling, greedy, random_features, tiny_qwen3_config
from drafter_reference import Eagle3Reference, dspark_block_hidden, dspark_greedy
from safetensors.torch import save_file

from ascend_dspark.drafters import DFlashDrafter, DSparkDrafter, Eagle3Drafter, load_deepspec_drafter, load_drafter
from ascend_dspark.drafters.deepspec import deepspec_drafter_config

LAYER_IDS = [0, 2, 4]          # tiny target has 6 layers; 5 is the last and is refused


def layer_tensors(prefix: str, h: int, i: int, nh: int, nkv: int, hd: int, attn_in: int) -> dict[str, tuple]:
    return {
        f"{prefix}input_layernorm.weight": (h,),
        f"{prefix}self_attn.q_proj.weight": (nh * hd, attn_in),
        f"{prefix}self_attn.k_proj.weight": (nkv * hd, attn_in),
        f"{prefix}self_attn.v_proj.weight": (nkv * hd, attn_in),
        f"{prefix}self_attn.o_proj.weight": (h, nh * hd),
        f"{prefix}self_attn.q_norm.weight": (hd,),
        f"{prefix}self_attn.k_norm.weight": (hd,),
        f"{prefix}post_attention_layernorm.weight": (h,),
        f"{prefix}mlp.gate_proj.weight": (i, h),
        f"{prefix}mlp.up_proj.weight": (i, h),
        f"{prefix}mlp.down_proj.weight": (h, i),
    }


def deepspec_shapes(arch: str, tc, num_layers: int = 2, rank: int = 16, confidence: bool = True,
                    with_markov: bool = True) -> dict[str, tuple]:
    h, i, nh, nkv, hd, v = tc.hidden_size, tc.intermediate_size, tc.num_heads, tc.num_kv_heads, tc.head_dim, tc.vocab_size
    m = len(LAYER_IDS)
    shapes = {"embed_tokens.weight": (v, h), "fc.weight": (h, m * h), "norm.weight": (h,), "lm_head.weight": (v, h)}
    if arch == "Qwen3Eagle3Model":
        shapes.update(layer_tensors("layers.0.", h, i, nh, nkv, hd, 2 * h))
        shapes["layers.0.hidden_norm.weight"] = (h,)
        return shapes
    shapes["hidden_norm.weight"] = (h,)
    for layer in range(num_layers):
        shapes.update(layer_tensors(f"layers.{layer}.", h, i, nh, nkv, hd, h))
    if rank:
        shapes["markov_head.markov_w1.weight"] = (v, rank)
        shapes["markov_head.markov_w2.weight"] = (v, rank)
    if confidence:
        shapes["confidence_head.proj.weight"] = (1, h + (rank if with_markov else 0))
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


def write_deepspec(path, target, arch="Qwen3DSparkModel", num_layers=2, rank=16, confidence=True, with_markov=True,
                   block_size=5, dtype=torch.float64, config_overrides=None, tensor_overrides=None, drop=(),
                   extra=None, seed=3, rope_spelling="parameters"):
    """Write a DeepSpec-style export; returns the state dict (float64) that was written."""
    tc = target.config
    shapes = deepspec_shapes(arch, tc, num_layers, rank, confidence, with_markov)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        sd[name] = 1.0 + 0.1 * noise if "norm" in name else 0.2 * noise
    sd["embed_tokens.weight"] = target.model.embed_tokens.weight.detach().clone()
    sd["lm_head.weight"] = target.lm_head.weight.detach().clone()
    sd.update(tensor_overrides or {})
    sd.update(extra or {})
    for name in drop:
        sd.pop(name)
    raw = tiny_qwen3_config(num_hidden_layers=num_layers if arch != "Qwen3Eagle3Model" else 1)
    raw.pop("layer_types", None)
    if rope_spelling == "theta":
        raw.pop("rope_parameters", None)
        raw["rope_theta"] = 10000.0
    raw.update(architectures=[arch], num_target_layers=tc.num_layers, target_layer_ids=LAYER_IDS,
               tie_word_embeddings=False, _attn_implementation="flex_attention")
    if arch == "Qwen3Eagle3Model":
        raw.update(draft_num_hidden_layers=1, ttt_length=4, step_loss_decay=0.8)
    else:
        raw.update(block_size=block_size, mask_token_id=tc.vocab_size - 1, num_anchors=512, markov_rank=rank,
                   enable_confidence_head=confidence)
        if rank:
            raw["markov_head_type"] = "vanilla"
        if confidence:
            raw["confidence_head_with_markov"] = with_markov
    raw.update(config_overrides or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return sd


def ref_cfg(drafter, sd_has_markov=True):
    c = drafter.config
    return dict(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, theta=10000.0,
                block_size=c.block_size, mask_token_id=c.mask_token_id, num_layers=c.num_layers,
                with_markov=c.confidence_head_with_markov, qk_norm=c.qk_norm)


def test_tensor_counts_match_the_spec(target):
    tc = target.config
    assert len(deepspec_shapes("Qwen3DSparkModel", tc, num_layers=5)) == 64
    assert len(deepspec_shapes("Qwen3DSparkModel", tc, num_layers=5, rank=0, confidence=False)) == 60
    assert len(deepspec_shapes("Qwen3Eagle3Model", tc)) == 16


def test_dspark_loads_and_matches_direct_computation(tmp_path, target):
    sd = write_deepspec(tmp_path, target)
    drafter = load_deepspec_drafter(tmp_path, target)
    assert isinstance(drafter, DSparkDrafter)
    assert drafter.max_draft_tokens == 5 and drafter.config.anchor_first
    assert drafter.target_layer_ids == tuple(LAYER_IDS)
    assert "embed_tokens.weight" not in drafter.state_dict() and "lm_head.weight" not in drafter.state_dict()
    assert drafter.dtype == torch.float64

    start, anchor = 6, 17
    feats = random_features(drafter, 1, start)
    drafter.allocate(2, 32)
    slot = torch.tensor([1])
    drafter.observe(slot, feats, torch.arange(start).unsqueeze(0), torch.zeros(1, start, dtype=torch.long),
                    torch.tensor([start]))
    h = drafter.block_hidden(slot, torch.tensor([anchor]), torch.tensor([start]))
    ref_h = dspark_block_hidden(sd, ref_cfg(drafter), target.embed, feats[0], anchor, start)
    torch.testing.assert_close(h[0], ref_h, rtol=1e-5, atol=1e-5)

    prop = drafter.propose(slot, torch.tensor([anchor]), torch.tensor([start]), 5, greedy(1))
    tokens, logits, conf = dspark_greedy(sd, ref_cfg(drafter), ref_h, anchor, sd["lm_head.weight"])
    assert prop.tokens[0].tolist() == tokens
    torch.testing.assert_close(prop.confidence[0], conf.float(), rtol=1e-5, atol=1e-6)

    # Non-greedy: the proposal's probs are softmax of the Markov-corrected logits of the chain it drew.
    sampling = SoftmaxSampling(1, forced=[torch.tensor([t]) for t in tokens])
    prop = drafter.propose(slot, torch.tensor([anchor]), torch.tensor([start]), 5, sampling)
    torch.testing.assert_close(prop.probs[0], torch.softmax(logits.float(), -1), rtol=1e-5, atol=1e-6)


def test_confidence_without_markov_input(tmp_path, target):
    sd = write_deepspec(tmp_path, target, with_markov=False)
    drafter = load_deepspec_drafter(tmp_path, target)
    assert drafter.confidence_head.proj.weight.shape == (1, target.config.hidden_size)
    drafter.allocate(1, 32)
    feats = random_features(drafter, 1, 4)
    drafter.observe(torch.tensor([0]), feats, torch.arange(4).unsqueeze(0), torch.zeros(1, 4, dtype=torch.long),
                    torch.tensor([4]))
    prop = drafter.propose(torch.tensor([0]), torch.tensor([3]), torch.tensor([4]), 5, greedy(1))
    ref_h = dspark_block_hidden(sd, ref_cfg(drafter), target.embed, feats[0], 3, 4)
    _, _, conf = dspark_greedy(sd, ref_cfg(drafter), ref_h, 3, sd["lm_head.weight"])
    torch.testing.assert_close(prop.confidence[0], conf.float(), rtol=1e-5, atol=1e-6)


def test_deepspec_dflash_is_anchor_first(tmp_path, target):
    sd = write_deepspec(tmp_path, target, rank=0, confidence=False, block_size=4)
    drafter = load_drafter(tmp_path, target)                      # dispatches on architectures
    assert isinstance(drafter, DFlashDrafter)
    assert drafter.config.anchor_first and drafter.max_draft_tokens == 4
    drafter.allocate(1, 32)
    feats = random_features(drafter, 1, 5)
    drafter.observe(torch.tensor([0]), feats, torch.arange(5).unsqueeze(0), torch.zeros(1, 5, dtype=torch.long),
                    torch.tensor([5]))
    prop = drafter.propose(torch.tensor([0]), torch.tensor([9]), torch.tensor([5]), 4, greedy(1))
    assert prop.confidence is None
    ref_h = dspark_block_hidden(sd, ref_cfg(drafter), target.embed, feats[0], 9, 5)
    expected = (ref_h @ sd["lm_head.weight"].T).argmax(-1)        # independent per slot, slot k -> start+1+k
    assert prop.tokens[0].tolist() == expected.tolist()


def test_eagle3_loads_and_matches_direct_computation(tmp_path, target):
    sd = write_deepspec(tmp_path, target, arch="Qwen3Eagle3Model")
    assert len(sd) == 16
    drafter = load_deepspec_drafter(tmp_path, target)
    assert isinstance(drafter, Eagle3Drafter) and drafter.max_draft_tokens == 4
    n = 7
    feats = random_features(drafter, 1, n)
    nxt = torch.randint(0, target.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(4))
    drafter.allocate(1, 32)
    drafter.observe(torch.tensor([0]), feats, torch.arange(n).unsqueeze(0), nxt, torch.tensor([n]))
    prop = drafter.propose(torch.tensor([0]), nxt[:, -1], torch.tensor([n]), 4, greedy(1))
    ref = Eagle3Reference(sd, ref_cfg(drafter), target.embed, sd["lm_head.weight"])
    tokens, logits = ref.greedy(feats[0], nxt[0], 4)
    assert prop.tokens[0].tolist() == tokens
    sampling = SoftmaxSampling(1, forced=[torch.tensor([t]) for t in tokens])
    prop = drafter.propose(torch.tensor([0]), nxt[:, -1], torch.tensor([n]), 4, sampling)
    torch.testing.assert_close(prop.probs[0], torch.softmax(logits.float(), -1), rtol=1e-5, atol=1e-6)


def test_bf16_export_and_rope_theta_spelling(tmp_path, target):
    write_deepspec(tmp_path / "a", target, dtype=torch.bfloat16, rope_spelling="theta")
    write_deepspec(tmp_path / "b", target, dtype=torch.bfloat16, rope_spelling="parameters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # bf16 copies of float64 embeddings differ: warned, target's kept
        a = load_deepspec_drafter(tmp_path / "a", target)
        b = load_deepspec_drafter(tmp_path / "b", target)
    assert a.config.rope == b.config.rope
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_sharded_index(tmp_path, target):
    sd = write_deepspec(tmp_path, target)
    (tmp_path / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(tmp_path / file))
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    drafter = load_deepspec_drafter(tmp_path, target)
    torch.testing.assert_close(drafter.fc.weight, sd["fc.weight"])


def test_wrong_shape_names_the_tensor(tmp_path, target):
    h = target.config.hidden_size
    write_deepspec(tmp_path, target, tensor_overrides={"layers.1.mlp.up_proj.weight": torch.zeros(7, h)})
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*\[7, 32\].*\[64, 32\]"):
        load_deepspec_drafter(tmp_path, target)


def test_fc_width_mismatch_names_fc(tmp_path, target):
    h = target.config.hidden_size
    write_deepspec(tmp_path, target, tensor_overrides={"fc.weight": torch.zeros(h, 5 * h, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"fc\.weight.*\[32, 160\].*\[32, 96\]"):
        load_deepspec_drafter(tmp_path, target)


def test_markov_rows_mismatch(tmp_path, target):
    write_deepspec(tmp_path, target, tensor_overrides={"markov_head.markov_w1.weight": torch.zeros(50, 16)})
    with pytest.raises(ValueError, match=r"markov_head\.markov_w1\.weight"):
        load_deepspec_drafter(tmp_path, target)


def test_missing_tensor(tmp_path, target):
    write_deepspec(tmp_path, target, drop=("layers.0.self_attn.k_norm.weight",))
    with pytest.raises(ValueError, match=r"missing tensor.*layers\.0\.self_attn\.k_norm\.weight"):
        load_deepspec_drafter(tmp_path, target)


def test_unexpected_tensor(tmp_path, target):
    write_deepspec(tmp_path, target, extra={"markov_head.gate_proj.weight": torch.zeros(16, 48)})
    with pytest.raises(ValueError, match=r"unexpected tensor.*markov_head\.gate_proj\.weight"):
        load_deepspec_drafter(tmp_path, target)


def test_hidden_size_mismatch(tmp_path, target):
    write_deepspec(tmp_path, target, config_overrides={"hidden_size": 48})
    with pytest.raises(ValueError, match="hidden_size 48 != target hidden_size 32"):
        load_deepspec_drafter(tmp_path, target)


def test_vocab_mismatch(tmp_path, target):
    write_deepspec(tmp_path, target, config_overrides={"vocab_size": 100})
    with pytest.raises(ValueError, match="vocab_size 100 != target vocab_size 96"):
        load_deepspec_drafter(tmp_path, target)


def test_embedding_shape_mismatch(tmp_path, target):
    write_deepspec(tmp_path, target, tensor_overrides={"embed_tokens.weight": torch.zeros(95, 32)})
    with pytest.raises(ValueError, match=r"embed_tokens\.weight.*\[95, 32\].*\[96, 32\]"):
        load_deepspec_drafter(tmp_path, target)


def test_last_target_layer_refused(tmp_path, target):
    write_deepspec(tmp_path, target, config_overrides={"target_layer_ids": [1, 5]})
    with pytest.raises(ValueError, match="last target layer"):
        load_deepspec_drafter(tmp_path, target)


def test_target_layer_count_mismatch(tmp_path, target):
    write_deepspec(tmp_path, target, config_overrides={"num_target_layers": 36})
    with pytest.raises(ValueError, match="num_target_layers=36"):
        load_deepspec_drafter(tmp_path, target)


def test_different_embedding_warns_and_keeps_targets(tmp_path, target):
    sd = write_deepspec(tmp_path, target)
    sd_lm = sd["lm_head.weight"].clone()
    sd_lm[3] += 1.0
    write_deepspec(tmp_path, target, tensor_overrides={"lm_head.weight": sd_lm})
    with pytest.warns(UserWarning, match=r"lm_head\.weight.*using the target's"):
        drafter = load_deepspec_drafter(tmp_path, target)
    assert drafter.target is target


def test_missing_files(tmp_path, target):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_deepspec_drafter(tmp_path / "nope", target)
    write_deepspec(tmp_path / "d", target)
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_deepspec_drafter(tmp_path / "d", target)
    (tmp_path / "d" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_drafter(tmp_path / "d", target)


def test_gemma4_and_unknown_archs(target):
    with pytest.raises(NotImplementedError, match="Gemma4DSparkModel"):
        deepspec_drafter_config({"architectures": ["Gemma4DSparkModel"], "model_type": "gemma4_text"})
    with pytest.raises(NotImplementedError, match="Gemma4Eagle3Model"):
        deepspec_drafter_config({"architectures": ["Gemma4Eagle3Model"]})
    with pytest.raises(ValueError, match="DFlashDraftModel"):
        deepspec_drafter_config({"architectures": ["DFlashDraftModel"]})
    raw = {**tiny_qwen3_config(num_hidden_layers=2), "architectures": ["Qwen3DSparkModel"], "target_layer_ids": [1],
           "block_size": 7, "mask_token_id": 1, "markov_rank": 8, "markov_head_type": "rnn"}
    raw.pop("layer_types", None)
    assert deepspec_drafter_config({**raw, "markov_head_type": "RNN"}).markov_head_type == "rnn"
    with pytest.raises(ValueError, match="lstm"):
        deepspec_drafter_config({**raw, "markov_head_type": "lstm"})
