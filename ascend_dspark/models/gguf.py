"""GGUF -> plain HF safetensors checkpoint, converted once into a cache directory.

transformers already knows how to de-quantize GGUF tensors and rebuild the tokenizer,
but reading a GGUF is slow (tens of seconds even for 135M parameters) and gives float32
weights whatever the file held. So we convert once into
`$ASCEND_DSPARK_CACHE/models/<stem>-<key>` (default cache root
`${XDG_CACHE_HOME:-~/.cache}/ascend-dspark`) and load that directory like any other
checkpoint afterwards. The key hashes the file's size and mtime, so replacing the file
converts again. Writes go to a temporary directory renamed into place, so concurrent
processes and interrupted conversions never leave a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "ASCEND_DSPARK_CACHE"
_FORMAT_VERSION = 1          # bump when the converted layout changes: old caches are ignored


def cache_root() -> Path:
    """The project's cache directory (`ASCEND_DSPARK_CACHE` overrides it)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ascend-dspark"


def converted_dir(gguf_path: Path) -> Path:
    """Where the conversion of this GGUF file lives (whether or not it exists yet)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{_FORMAT_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: str | Path) -> Path:
    """Return an HF checkpoint directory for a GGUF file, converting it on first use."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    target = converted_dir(gguf_path)
    if target.is_dir():
        return target
    logger.warning("converting %s once to safetensors in %s (reused afterwards)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)                     # mkdtemp makes it private; the cache may be shared
    try:
        _write_checkpoint(gguf_path, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():      # not "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_checkpoint(gguf_path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-"quantized" model, although the weights
    # are already de-quantized: write config and tensors ourselves, as a plain checkpoint.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(out))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)      # shared with the embedding: stored once
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
