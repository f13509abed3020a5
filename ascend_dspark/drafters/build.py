"""Building drafters: the class of each kind, configs sized from the target, random
initialisation, and placement beside the target.

`create_drafter` and every checkpoint loader build through `build_drafter`, so a drafter is
checked against its target (hidden size, vocabulary, tapped layers) the same way whatever
it came from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Drafter
from .config import KINDS, DrafterConfig
from .dflash import DFlashDrafter
from .dspark import DSparkDrafter
from .eagle3 import Eagle3Drafter
from .layers import init_weights

DRAFTER_CLASSES: dict[str, type[Drafter]] = {"eagle3": Eagle3Drafter, "dflash": DFlashDrafter,
                                             "dspark": DSparkDrafter}
DEFAULT_SEED = 0
INIT_STD = 0.02


def build_drafter(cfg: DrafterConfig, target: nn.Module) -> Drafter:
    """An uninitialised drafter of `cfg.kind` paired with `target` (validated)."""
    return DRAFTER_CLASSES[cfg.kind](cfg, target)


def placement(target: nn.Module, dtype: torch.dtype | None) -> dict[str, Any]:
    """`.to()` arguments that put a drafter on the target's device, in `dtype` (default: the
    target's parameter dtype)."""
    p = next(target.parameters(), None)
    if p is None:
        return {"dtype": dtype} if dtype is not None else {}
    return {"device": p.device, "dtype": dtype or p.dtype}


def default_layer_ids(kind: str, num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Target layers to tap ("output of layer j" ids), clamped to -1..Lt-2.

    eagle3: [1, Lt//2 - 1, Lt - 4] (EAGLE-3 / SpecForge). dflash / dspark: z-lab's
    `build_target_layer_ids` spread from 1 to Lt - 3 over max(3, draft layers) taps
    (Lt = 36, 5 taps gives DeepSpec's [1, 9, 17, 25, 33]).
    """
    lt = num_target_layers
    if kind == "eagle3":
        ids = [1, lt // 2 - 1, lt - 4]
    else:
        n = max(3, num_draft_layers)
        start, end = 1, lt - 3
        ids = [int(round(start + i * (end - start) / (n - 1))) for i in range(n)]
    return [min(max(j, -1), lt - 2) for j in ids]


def default_config(kind: str, target: nn.Module, **overrides: Any) -> DrafterConfig:
    """A DrafterConfig sized from the target's config, with `overrides` applied."""
    tc = target.config
    unknown = sorted(set(overrides) - DrafterConfig.field_names() - {"kind"})
    if unknown:
        raise TypeError(f"unknown drafter option(s): {', '.join(unknown)}")
    rope = dict((tc.rope or {}).get("full_attention") or {"rope_type": "default", "rope_theta": 10000.0})
    base: dict[str, Any] = dict(
        kind=kind, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_heads=tc.num_heads, num_kv_heads=tc.num_kv_heads, head_dim=tc.head_dim,
        vocab_size=tc.vocab_size, rms_norm_eps=tc.rms_norm_eps, hidden_act=tc.hidden_act,
        attention_bias=False, rope=rope,
    )
    raw_mask = (getattr(tc, "raw", None) or {}).get("mask_token_id")
    mask_token_id = raw_mask if isinstance(raw_mask, int) and 0 <= raw_mask < tc.vocab_size else tc.vocab_size - 1
    if kind == "eagle3":
        base.update(num_layers=1, qk_norm=bool(tc.qk_norm), ttt_length=7)
    elif kind == "dflash":
        base.update(num_layers=2, qk_norm=True, block_size=8, anchor_first=False, mask_token_id=mask_token_id)
    elif kind == "dspark":
        base.update(num_layers=2, qk_norm=True, block_size=7, anchor_first=True, mask_token_id=mask_token_id,
                    markov_rank=64, confidence_head=True, confidence_head_with_markov=True)
    else:
        raise ValueError(f"unknown drafter kind {kind!r}; expected one of {', '.join(KINDS)}")
    base.update(overrides)
    if "target_layer_ids" not in overrides:
        base["target_layer_ids"] = default_layer_ids(kind, tc.num_layers, base["num_layers"])
    return DrafterConfig(**base)


def create_drafter(kind: str, target: nn.Module, *, seed: int = DEFAULT_SEED, dtype: torch.dtype | None = None,
                   **overrides: Any) -> Drafter:
    """A randomly initialised drafter for `target` (N(0, 0.02) weights, unit norms, seeded).

    `overrides` are DrafterConfig fields (num_layers, block_size, anchor_first, markov_rank,
    target_layer_ids, mask_token_id, ...). The drafter lands on the target's device, in
    `dtype` (default: the target's parameter dtype).
    """
    cfg = default_config(kind, target, **overrides)
    drafter = build_drafter(cfg, target)
    init_weights(drafter, seed, INIT_STD)
    return drafter.to(**placement(target, dtype))
