"""Projections that read the same input, stored as one weight: one matmul launch, not three.

Why: at decode sizes every projection is a weight-streaming launch, and q / k / v (and the
MLP's gate / up) read the same activations. Stored as one [sum(parts), in] matrix they cost
one launch and one pass over the input. Checkpoints keep the parts' own names: the state
dict splits the merged weight back into `q_proj.weight`, `k_proj.weight`, ... and loading
concatenates them, so HF safetensors, GGUF conversions and drafter exports are unchanged.
(Tensor parallelism shards the merged weight by rows, part by part.)
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ops.registry import DEVICE_DEFAULTS, OpRegistry


class MergedLinear(nn.Module):
    """Linear layers `parts` (name -> output features) over one input, as one matmul.

    Held by a parent module under `name` (e.g. `qkv_proj`); `keep_part_names` makes the
    parent's state dict speak the parts' names."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__()
        self.parts = dict(parts)
        out = sum(self.parts.values())
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def forward(self, x: torch.Tensor, registry: OpRegistry = DEVICE_DEFAULTS) -> tuple[torch.Tensor, ...]:
        """Each part's output, in the order of `parts` (views of one [..., sum] result)."""
        return registry.linear(x, self.weight, self.bias).split(list(self.parts.values()), dim=-1)


def keep_part_names(parent: nn.Module, name: str) -> None:
    """Load and save `parent.<name>` (a MergedLinear) under its parts' names."""
    parent.register_load_state_dict_pre_hook(partial(_merge_on_load, name))
    parent.register_state_dict_post_hook(partial(_split_on_save, name))


def _kinds(merged: MergedLinear) -> tuple[str, ...]:
    return ("weight",) if merged.bias is None else ("weight", "bias")


def _merge_on_load(name: str, module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Concatenate the parts' tensors into the merged one. When only some parts are present,
    nothing is merged: the load then reports the missing and unexpected names itself."""
    merged = getattr(module, name)
    for kind in _kinds(merged):
        keys = [f"{prefix}{part}.{kind}" for part in merged.parts]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{name}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])


def _split_on_save(name: str, module: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    """Replace the merged tensor by one copy per part: copies, not views, because safetensors
    refuses tensors that share storage (a state dict is for saving and comparing)."""
    merged = getattr(module, name)
    sizes = list(merged.parts.values())
    for kind in _kinds(merged):
        whole = state_dict.pop(f"{prefix}{name}.{kind}", None)
        if whole is None:
            continue
        for part, piece in zip(merged.parts, whole.split(sizes)):
            state_dict[f"{prefix}{part}.{kind}"] = piece.clone()
