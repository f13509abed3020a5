"""Load DeepSpec draft exports (shared/specs/checkpoint-formats.md §1.3-1.5, §5.1-5.2).

Supported `architectures[0]`:
- `Qwen3DSparkModel`: DSpark (markov_rank > 0 or confidence head on) or DeepSpec's DFlash
  (markov_rank 0, no confidence head). Both use the anchor-first block layout.
- `Qwen3Eagle3Model` (and the legacy name `Eagle3DraftModel`): one-layer EAGLE-3, q/k/v from 2H.
- `Gemma4DSparkModel` / `Gemma4Eagle3Model`: NotImplementedError (their layers differ: scaled
  embedding, k_eq_v attention, four norms, layer_scalar; see §5.1 step 8).

Tensor names map by identity (no prefix): `fc.weight`, `hidden_norm.weight`, `norm.weight`,
`layers.{i}.*`, `markov_head.markov_w{1,2}.weight` (+ `markov_head.gate_proj.*` for the gated
head, `markov_head.joint_proj.*` for the RNN head: `markov_head_type`, case-insensitive),
`confidence_head.proj.{weight,bias}`, plus `embed_tokens.weight` / `lm_head.weight`. Loading
is `draft_dir.load_draft_dir`'s, strict like every format's: every tensor's shape is checked
against what the config implies, and a missing or unexpected tensor is an error.

Embedding and LM head: DeepSpec stores frozen copies of the target's. The drafter always
uses the **target's** modules (the protocol shares them), so the stored copies are only
checked: same shape as the target's [V, H] (error otherwise) and same values after casting
the target's to the stored dtype (one warning with the largest difference otherwise, e.g.
when the draft was trained against a different revision of the target).
`drafters/export.py:export_deepspec` writes this format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ascend_dspark.models.config import ModelConfig

from .base import Drafter
from .config import MARKOV_HEAD_TYPES, DrafterConfig
from .draft_dir import load_draft_dir, transformers_fields

DSPARK_ARCHS = ("Qwen3DSparkModel",)
EAGLE3_ARCHS = ("Qwen3Eagle3Model", "Eagle3DraftModel")
GEMMA4_ARCHS = ("Gemma4DSparkModel", "Gemma4Eagle3Model")


def deepspec_drafter_config(raw: dict[str, Any], source: str = "config.json") -> DrafterConfig:
    """DrafterConfig from a DeepSpec config.json (target config + draft keys)."""
    archs = raw.get("architectures") or []
    if not archs:
        raise ValueError(f"{source}: no \"architectures\" entry; cannot tell which DeepSpec draft this is")
    arch = archs[0]
    if arch in GEMMA4_ARCHS:
        raise NotImplementedError(
            f"{source}: {arch} (DeepSpec Gemma4 draft) is not supported yet: it needs Gemma4 layers (scaled "
            "embedding, k_eq_v attention, pre/post feed-forward norms, layer_scalar, soft-capped logits)")
    if arch not in DSPARK_ARCHS + EAGLE3_ARCHS:
        raise ValueError(f"{source}: architecture {arch!r} is not a DeepSpec draft; expected one of "
                         f"{', '.join(DSPARK_ARCHS + EAGLE3_ARCHS + GEMMA4_ARCHS)}")
    if "target_layer_ids" not in raw:
        raise ValueError(f"{source}: missing \"target_layer_ids\"")
    mc = ModelConfig.from_dict(raw)
    common = dict(transformers_fields(mc), target_layer_ids=list(raw["target_layer_ids"]))
    if arch in EAGLE3_ARCHS:
        layers = raw.get("draft_num_hidden_layers", mc.num_layers)
        if mc.num_layers != 1 or layers != 1:
            raise ValueError(f"{source}: a DeepSpec EAGLE-3 draft has one layer, config says "
                             f"num_hidden_layers={mc.num_layers}")
        return DrafterConfig(kind="eagle3", ttt_length=int(raw.get("ttt_length") or 7), **common)
    for key in ("block_size", "mask_token_id"):
        if key not in raw:
            raise ValueError(f"{source}: {arch} config is missing \"{key}\"")
    rank = int(raw.get("markov_rank") or 0)
    head_type = str(raw.get("markov_head_type") or "vanilla").lower() if rank > 0 else "vanilla"
    if head_type not in MARKOV_HEAD_TYPES:
        raise ValueError(f"{source}: markov_head_type {raw.get('markov_head_type')!r} is not one of DeepSpec's "
                         f"{', '.join(MARKOV_HEAD_TYPES)}")
    confidence = bool(raw.get("enable_confidence_head", False))
    kind = "dspark" if rank > 0 or confidence else "dflash"
    with_markov = raw.get("confidence_head_with_markov")
    return DrafterConfig(
        kind=kind, block_size=int(raw["block_size"]), anchor_first=True, mask_token_id=int(raw["mask_token_id"]),
        markov_rank=rank, markov_head_type=head_type, confidence_head=confidence,
        confidence_head_with_markov=True if with_markov is None else bool(with_markov), **common)


def load_deepspec_drafter(path: str | Path, target: nn.Module, dtype: torch.dtype | None = None) -> Drafter:
    """Load a DeepSpec draft directory (config.json + model.safetensors or sharded index) for `target`."""
    return load_draft_dir(path, target, dtype, "DeepSpec draft", deepspec_drafter_config, target_copies=True)
