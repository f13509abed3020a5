"""This project's own draft format: read and write.

A directory with
- `config.json`: `{"drafter": kind, "format": "ascend-dspark", "version": 1, ...DrafterConfig fields}`;
- the drafter's own parameters under DeepSpec's names, without `embed_tokens` / `lm_head`
  (those are the target's): one `model.safetensors`, or, saved with `max_shard_bytes`,
  transformers-style shards and `model.safetensors.index.json` (`weights.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Drafter
from .config import DrafterConfig
from .draft_dir import CONFIG_FILE, load_draft_dir
from .weights import write_weights

FORMAT = "ascend-dspark"
VERSION = 1


def native_drafter_config(raw: dict[str, Any], source: str) -> DrafterConfig:
    """DrafterConfig from our config.json; refuses other formats and other versions."""
    if raw.get("format") != FORMAT:
        raise ValueError(f"{source}: not an {FORMAT} drafter config (no \"format\": \"{FORMAT}\") and not a "
                         "transformers-style export (no \"architectures\")")
    if raw.get("version") != VERSION:
        raise ValueError(f"{source}: unsupported {FORMAT} version {raw.get('version')!r} (this code reads {VERSION})")
    fields = {k: v for k, v in raw.items() if k not in ("drafter", "format", "version")}
    return DrafterConfig.from_dict({"kind": raw.get("drafter"), **fields})


def load_native_drafter(path: str | Path, target: nn.Module, dtype: torch.dtype | None = None) -> Drafter:
    """Load a drafter saved by `save_drafter` (single file or shards) for `target`."""
    return load_draft_dir(path, target, dtype, "drafter checkpoint", native_drafter_config)


def save_drafter(drafter: Drafter, path: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write `config.json` + the drafter's own parameters into `path`: one model.safetensors,
    or shards of at most `max_shard_bytes` tensor bytes each (`weights.write_weights`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"drafter": drafter.config.kind, "format": FORMAT, "version": VERSION, **drafter.config.to_dict()}
    config.pop("kind")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    write_weights(path, state, {"format": FORMAT, "drafter": drafter.config.kind}, max_shard_bytes)
    return path
