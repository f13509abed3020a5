"""Draft weights on disk: one `model.safetensors`, or shards in transformers' layout.

Shards are `model-00001-of-0000N.safetensors` files plus `model.safetensors.index.json` =
`{"metadata": {"total_size": tensor bytes}, "weight_map": {tensor name: shard file}}`, so HF
tools read them too and a big draft can be kept in files under a size limit. Reading starts
from the headers (names and shapes, no tensor data), so a wrong checkpoint is refused before
it costs the memory of a load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-*-of-*.safetensors"


def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors or model.safetensors.index.json."""
    single = path / WEIGHTS_FILE
    index = path / INDEX_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        out = {}
        for name, shard in weight_map.items():
            file = path / shard
            if not file.is_file():
                raise FileNotFoundError(f"safetensors shard {file} (named in {index}) not found")
            out[name] = file
        return out
    raise FileNotFoundError(f"no drafter weights in {path}: expected {single} or {index}")


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes read from the safetensors headers (no tensor data is loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if files.get(name) == file:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise ValueError(f"tensor(s) {', '.join(missing)} listed in the index but absent from their shard")
    return shapes


def read_tensors(files: dict[str, Path], names) -> dict[str, torch.Tensor]:
    """The named tensors, each file opened once, in their stored dtype."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                state[name] = f.get_tensor(name)
    return state


def write_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  max_shard_bytes: int | None = None) -> None:
    """Write `tensors` (contiguous, on the CPU) into the directory `path`.

    Without `max_shard_bytes`, or when everything fits in one shard: one model.safetensors.
    Otherwise shards of at most `max_shard_bytes` tensor bytes each, filled in order; as in
    transformers, a tensor bigger than that gets a shard of its own, and each file's header
    adds a few KiB on top. Weight files an earlier save left in `path` are removed first:
    the loader prefers model.safetensors, so a stale one would hide new shards.
    """
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    for stale in [path / WEIGHTS_FILE, path / INDEX_FILE, *path.glob(SHARD_PATTERN)]:
        stale.unlink(missing_ok=True)
    shards = shard_names(tensors, max_shard_bytes) if max_shard_bytes is not None else [list(tensors)]
    if len(shards) == 1:
        save_file(tensors, str(path / WEIGHTS_FILE), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, str(path / file), metadata=metadata)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def shard_names(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order: a new shard starts where the next tensor would
    take the current one over `max_shard_bytes`."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
