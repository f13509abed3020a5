"""Write a trained draft for shipping: cast to bf16, and split into safetensors shards when
one file would pass the size limit of what comes back from the GPU machine (16 MiB a file).

Shards follow Hugging Face's convention, `model-00001-of-00003.safetensors` ... plus
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {tensor: file}}),
which `drafters.checkpoint.weight_files` already resolves; a draft that fits one file keeps
the single `model.safetensors` every loader reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ascend_dspark.drafters import save_drafter

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 15 * 2**20


def shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_bytes` each (in name order; a tensor
    larger than max_bytes gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(sizes):
        if shards[-1] and used + sizes[name] > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def save_drafter_sharded(drafter: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = torch.bfloat16,
                         max_bytes: int | None = None) -> Path:
    """`save_drafter`'s config.json and weights (floating tensors cast to `dtype`), sharded
    when the weights pass `max_bytes` (default MAX_SHARD_BYTES). Returns the directory."""
    from safetensors.torch import load_file, save_file

    max_bytes = MAX_SHARD_BYTES if max_bytes is None else max_bytes
    path = Path(path)
    save_drafter(drafter, path)                       # config.json + full-precision weights
    single = path / WEIGHTS_FILE
    state = load_file(str(single))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    for old in path.glob("model-*-of-*.safetensors"):
        old.unlink()
    (path / INDEX_FILE).unlink(missing_ok=True)
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    metadata = {"format": "ascend-dspark", "drafter": drafter.config.kind}
    if sum(sizes.values()) <= max_bytes:
        save_file(state, str(single), metadata=metadata)
        return path
    single.unlink()
    plan = shard_plan(sizes, max_bytes)
    weight_map = {}
    for i, names in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in names}, str(path / file), metadata=metadata)
        weight_map.update({k: file for k in names})
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())},
                                               "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return path
