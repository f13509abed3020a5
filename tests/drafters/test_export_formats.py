"""Export to DeepSpec's format and z-lab's DFlash format, and load back: names, config keys,
identical outputs, and clear refusals. Targets are `tests.helpers.tiny_target` models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from drafter_helpers import SoftmaxSampling, greedy, random_features, scramble
from drafter_reference import dspark_block_hidden
from safetensors import safe_open
from safetensors.torch import save_file

from ascend_dspark.drafters import (DFlashDrafter, DSparkDrafter, Eagle3Drafter, create_drafter, export_deepspec,
                                    export_zlab_dflash, load_deepspec_drafter, load_drafter, load_zlab_drafter)
from tests.helpers import tiny_target

LAYER_NAMES = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
               "self_attn.k_norm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
               "mlp.up_proj.weight", "mlp.down_proj.weight")


def target_for(arch="qwen3", num_layers=7, **overrides):
    return tiny_target(arch, num_layers=num_layers, **overrides)[0]


def stored(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def backbone_names(num_layers: int) -> set[str]:
    """checkpoint-formats.md §1.4 / §2.3: the block backbone (no prefix)."""
    names = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    return names | {f"layers.{i}.{n}" for i in range(num_layers) for n in LAYER_NAMES}


def deepspec_names(kind: str, num_layers: int, head: str | None, confidence: bool) -> set[str]:
    """checkpoint-formats.md §1.4-1.5, written out independently of the code."""
    if kind == "eagle3":
        return ({"embed_tokens.weight", "lm_head.weight", "fc.weight", "norm.weight", "layers.0.hidden_norm.weight"}
                | {f"layers.0.{n}" for n in LAYER_NAMES})
    names = backbone_names(num_layers) | {"embed_tokens.weight", "lm_head.weight"}
    if head:
        names |= {"markov_head.markov_w1.weight", "markov_head.markov_w2.weight"}
        names |= {"gated": {"markov_head.gate_proj.weight", "markov_head.gate_proj.bias"},
                  "rnn": {"markov_head.joint_proj.weight", "markov_head.joint_proj.bias"}}.get(head, set())
    if confidence:
        names |= {"confidence_head.proj.weight", "confidence_head.proj.bias"}
    return names


def outputs(drafter, sampling_factory):
    """Observe 6 positions in 2 slots, propose the maximum: (tokens, probs, confidence)."""
    drafter.allocate(2, 40)
    vocab = drafter.config.vocab_size
    nxt = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([0, 1])
    drafter.observe(slots, random_features(drafter, 2, 6), torch.arange(6).expand(2, 6), nxt, torch.tensor([6, 6]))
    prop = drafter.propose(slots, nxt[:, -1], torch.tensor([6, 6]), drafter.max_draft_tokens, sampling_factory(2))
    return prop.tokens, prop.probs, prop.confidence


def assert_same_outputs(a, b):
    for sampling in (greedy, lambda n: SoftmaxSampling(n, seed=4)):
        (ta, pa, ca), (tb, pb, cb) = outputs(a, sampling), outputs(b, sampling)
        assert torch.equal(ta, tb) and torch.equal(pa, pb)
        assert (ca is None and cb is None) or torch.equal(ca, cb)


# ------------------------------------------------------------------------------------------ DeepSpec
DEEPSPEC_CASES = {
    "eagle3": dict(kind="eagle3", target_layer_ids=[0, 1, 2, 3, 5]),
    "dflash": dict(kind="dflash", anchor_first=True, block_size=5),
    "dspark-vanilla": dict(kind="dspark", markov_head_type="vanilla"),
    "dspark-gated": dict(kind="dspark", markov_head_type="gated", block_size=4),
    "dspark-rnn": dict(kind="dspark", markov_head_type="rnn", confidence_head_with_markov=False),
    "dspark-confidence-only": dict(kind="dspark", markov_rank=0),
}


@pytest.mark.parametrize("name", list(DEEPSPEC_CASES))
def test_deepspec_export_loads_back_identically(name, tmp_path):
    target = target_for()
    options = dict(DEEPSPEC_CASES[name])
    kind = options.pop("kind")
    drafter = scramble(create_drafter(kind, target, **options), seed=5)
    export_deepspec(drafter, tmp_path)

    raw = json.loads((tmp_path / "config.json").read_text())
    cfg = drafter.config
    assert raw["model_type"] == "qwen3" and raw["tie_word_embeddings"] is False
    assert raw["num_hidden_layers"] == cfg.num_layers and raw["num_target_layers"] == 7
    assert raw["layer_types"] == ["full_attention"] * cfg.num_layers
    assert raw["target_layer_ids"] == cfg.target_layer_ids
    assert raw["rope_parameters"]["rope_theta"] == cfg.rope["rope_theta"]
    head = None
    if kind == "eagle3":
        assert raw["architectures"] == ["Qwen3Eagle3Model"] and raw["draft_num_hidden_layers"] == 1
        assert raw["ttt_length"] == cfg.ttt_length and raw["step_loss_decay"] > 0
    else:
        assert raw["architectures"] == ["Qwen3DSparkModel"]
        assert raw["block_size"] == cfg.block_size and raw["mask_token_id"] == cfg.mask_token_id
        assert raw["num_anchors"] > 0
        rank = cfg.markov_rank if kind == "dspark" else 0
        confidence = kind == "dspark" and cfg.confidence_head
        assert raw["markov_rank"] == rank and raw["enable_confidence_head"] == confidence
        head = cfg.markov_head_type if rank else None
        assert raw.get("markov_head_type") == head                            # present only if r > 0
        if confidence:
            assert raw["confidence_head_with_markov"] == bool(cfg.confidence_head_with_markov and rank)
        else:
            assert "confidence_head_with_markov" not in raw

    tensors = stored(tmp_path)
    assert set(tensors) == deepspec_names(kind, cfg.num_layers, head, kind == "dspark" and cfg.confidence_head)
    assert torch.equal(tensors["embed_tokens.weight"], target.model.embed_tokens.weight)
    assert torch.equal(tensors["lm_head.weight"], target.lm_head.weight)
    assert all(t.dtype == torch.float64 for t in tensors.values())

    hf = transformers.AutoConfig.from_pretrained(tmp_path)                    # what DeepSpec's eval reads first
    assert hf.model_type == "qwen3" and hf.num_hidden_layers == cfg.num_layers and hf.head_dim == cfg.head_dim
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                        # the stored copies match
        loaded = load_deepspec_drafter(tmp_path, target)
    expected_type = {"eagle3": Eagle3Drafter, "dflash": DFlashDrafter, "dspark": DSparkDrafter}[kind]
    assert type(loaded) is expected_type and loaded.config.anchor_first == cfg.anchor_first
    assert loaded.config.rope == cfg.rope and loaded.config.markov_head_type == cfg.markov_head_type
    for (ka, va), (kb, vb) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert_same_outputs(drafter, loaded)
    assert type(load_drafter(tmp_path, target)) is expected_type                # load_drafter dispatches too


def test_deepspec_export_of_a_llama_target_with_tied_embeddings(tmp_path):
    """Llama3 RoPE scaling round-trips through rope_parameters; a tied head is stored twice."""
    target = target_for("llama", tie_word_embeddings=True)
    drafter = scramble(create_drafter("dspark", target, markov_head_type="rnn"), seed=6)
    export_deepspec(drafter, tmp_path, dtype=torch.bfloat16)
    tensors = stored(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["embed_tokens.weight"], tensors["lm_head.weight"])
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                        # the target cast to bf16 matches
        loaded = load_deepspec_drafter(tmp_path, target, dtype=torch.float64)
    assert loaded.config == drafter.config
    for (ka, va), (kb, vb) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va.to(torch.bfloat16).double(), vb)


def test_deepspec_export_refusals(tmp_path):
    target = target_for()
    with pytest.raises(ValueError, match="anchor-first"):
        export_deepspec(create_drafter("dflash", target), tmp_path)           # fill-in layout
    with pytest.raises(ValueError, match="exactly 5"):
        export_deepspec(create_drafter("eagle3", target), tmp_path)           # 3 taps by default
    with pytest.raises(ValueError, match="strictly increasing"):
        export_deepspec(create_drafter("dspark", target, target_layer_ids=[2, 1]), tmp_path)
    with pytest.raises(ValueError, match="q/k norms"):
        export_deepspec(create_drafter("eagle3", target, qk_norm=False, target_layer_ids=[0, 1, 2, 3, 4]), tmp_path)
    with pytest.raises(ValueError, match="soft-caps"):
        export_deepspec(create_drafter("dspark", target_for("gemma3", num_layers=4)), tmp_path)
    assert not (tmp_path / "config.json").exists()


# ------------------------------------------------------------------------------------------ z-lab
def test_zlab_export_loads_back_identically(tmp_path):
    target = target_for()
    drafter = scramble(create_drafter("dflash", target, num_layers=3, block_size=6), seed=7)
    assert not drafter.config.anchor_first and drafter.max_draft_tokens == 5
    export_zlab_dflash(drafter, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["DFlashDraftModel"] and raw["model_type"] == "qwen3"
    assert raw["block_size"] == 6 and raw["num_hidden_layers"] == 3 and raw["num_target_layers"] == 7
    assert raw["dflash_config"] == {"mask_token_id": drafter.config.mask_token_id,
                                    "target_layer_ids": drafter.config.target_layer_ids}
    assert raw["rope_theta"] == drafter.config.rope["rope_theta"] and "auto_map" not in raw
    assert set(stored(tmp_path)) == backbone_names(3)                        # no embedding, no head
    loaded = load_drafter(tmp_path, target)                                  # dispatches on the architecture
    assert type(loaded) is DFlashDrafter and loaded.config == drafter.config
    assert_same_outputs(drafter, loaded)


def test_zlab_export_of_a_llama_target_keeps_its_rope(tmp_path):
    target = target_for("llama")
    drafter = scramble(create_drafter("dflash", target), seed=8)
    export_zlab_dflash(drafter, tmp_path, dtype=torch.float32)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in raw
    loaded = load_zlab_drafter(tmp_path, target)
    assert loaded.config == drafter.config and loaded.dtype == torch.float64


def test_zlab_export_refusals(tmp_path):
    target = target_for()
    for drafter in (create_drafter("dflash", target, anchor_first=True), create_drafter("dspark", target),
                    create_drafter("eagle3", target)):
        with pytest.raises(ValueError, match="fill-in DFlash"):
            export_zlab_dflash(drafter, tmp_path)
    with pytest.raises(ValueError, match="soft-caps"):
        export_zlab_dflash(create_drafter("dflash", target_for("gemma3", num_layers=4)), tmp_path)


def write_zlab(path, target, num_layers=2, block_size=5, layer_ids=(0, 2, 4), dflash_overrides=None,
               config_overrides=None, drop=(), extra=None, seed=9):
    """A z-lab draft written by hand from checkpoint-formats.md §2.2-2.3; returns its tensors."""
    tc = target.config
    h, i, hd = tc.hidden_size, tc.intermediate_size, tc.head_dim
    shapes = {"fc.weight": (h, len(layer_ids) * h), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for n in range(num_layers):
        p = f"layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (tc.num_heads * hd, h),
                       p + "self_attn.k_proj.weight": (tc.num_kv_heads * hd, h),
                       p + "self_attn.v_proj.weight": (tc.num_kv_heads * hd, h),
                       p + "self_attn.o_proj.weight": (h, tc.num_heads * hd),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        sd[name] = 1.0 + 0.1 * noise if "norm" in name else 0.2 * noise
    sd.update(extra or {})
    for name in drop:
        sd.pop(name)
    raw = {"architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
           "model_type": "qwen3", "block_size": block_size,
           "dflash_config": {"mask_token_id": tc.vocab_size - 1, "target_layer_ids": list(layer_ids)},
           "num_target_layers": tc.num_layers, "num_hidden_layers": num_layers, "hidden_size": h,
           "intermediate_size": i, "num_attention_heads": tc.num_heads, "num_key_value_heads": tc.num_kv_heads,
           "head_dim": hd, "layer_types": ["full_attention"] * num_layers, "rope_theta": 10000.0,
           "rope_scaling": None, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "vocab_size": tc.vocab_size,
           "hidden_act": "silu", "attention_bias": False, "sliding_window": None, "use_sliding_window": False,
           "max_window_layers": num_layers, "tie_word_embeddings": False, "dtype": "bfloat16"}
    raw["dflash_config"].update(dflash_overrides or {})
    raw.update(config_overrides or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return sd


def test_zlab_draft_decodes_fill_in(tmp_path, target):
    """Slot k >= 1 of [anchor, mask x (B-1)] drafts the token at anchor_pos + k (§2.4): B-1 drafts,
    each the argmax of the target head on the hand-computed block hidden state."""
    sd = write_zlab(tmp_path, target)
    drafter = load_drafter(tmp_path, target)
    assert type(drafter) is DFlashDrafter and not drafter.config.anchor_first and drafter.max_draft_tokens == 4
    start, anchor = 6, 17
    feats = random_features(drafter, 1, start)
    drafter.allocate(1, 32)
    drafter.observe(torch.tensor([0]), feats, torch.arange(start).unsqueeze(0),
                    torch.zeros(1, start, dtype=torch.long), torch.tensor([start]))
    prop = drafter.propose(torch.tensor([0]), torch.tensor([anchor]), torch.tensor([start]), 4, greedy(1))
    cfg = dict(num_heads=4, num_kv_heads=2, head_dim=8, theta=10000.0, block_size=5,
               mask_token_id=target.config.vocab_size - 1, num_layers=2)
    h = dspark_block_hidden(sd, cfg, target.embed, feats[0], anchor, start)
    expected = (h[1:] @ target.lm_head.weight.T).argmax(-1)                   # the anchor slot is unused
    assert prop.tokens[0].tolist() == expected.tolist()


def test_zlab_config_variants(tmp_path, target):
    # Newer repos put block_size inside dflash_config; ids default from num_target_layers (Lt=6, 2 layers).
    write_zlab(tmp_path / "a", target, layer_ids=(1, 3), dflash_overrides={"block_size": 4},
               config_overrides={"block_size": None})
    raw = json.loads((tmp_path / "a" / "config.json").read_text())
    del raw["dflash_config"]["target_layer_ids"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(raw))
    drafter = load_zlab_drafter(tmp_path / "a", target)
    assert drafter.config.block_size == 4 and drafter.target_layer_ids == (1, 3)   # round(1 + i * (6 - 4) / 1)


@pytest.mark.parametrize("change, error, match", [
    (dict(config_overrides={"dflash_config": None}), ValueError, "dflash_config"),
    (dict(dflash_overrides={"mask_token_id": None}), ValueError, "mask_token_id"),
    (dict(config_overrides={"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4}),
     NotImplementedError, "sliding"),
    (dict(dflash_overrides={"use_swa": True}), NotImplementedError, "use_swa"),
    (dict(config_overrides={"model_type": "llama"}), NotImplementedError, "llama"),
    (dict(config_overrides={"num_target_layers": 36}), ValueError, "num_target_layers=36"),
    (dict(config_overrides={"hidden_size": 48}), ValueError, "hidden_size 48 != target hidden_size 32"),
    (dict(drop=("layers.1.self_attn.q_norm.weight",)), ValueError, r"missing tensor.*layers\.1\.self_attn\.q_norm"),
    (dict(extra={"fc.weight": torch.zeros(32, 64, dtype=torch.float64)}), ValueError,
     r"fc\.weight.*\[32, 64\].*\[32, 96\]"),
    (dict(extra={"layers.2.norm.weight": torch.ones(32, dtype=torch.float64)}), ValueError,
     r"unexpected tensor.*layers\.2\.norm\.weight"),
    (dict(extra={"embed_tokens.weight": torch.zeros(96, 32, dtype=torch.float64)}), ValueError,
     r"embed_tokens\.weight.*target's"),
])
def test_zlab_errors(change, error, match, tmp_path, target):
    write_zlab(tmp_path, target, **change)
    with pytest.raises(error, match=match):
        load_drafter(tmp_path, target)
