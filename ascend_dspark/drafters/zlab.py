"""z-lab DFlash drafts (`DFlashDraftModel`; shared/specs/checkpoint-formats.md §2, §5.3): load and export.

A z-lab draft is the DFlash block backbone with DeepSpec's module names (`fc`,
`hidden_norm`, `layers.{i}.*`, `norm`) and nothing else: no embedding, no LM head (it
embeds and scores with the target's), no Markov or confidence head. Its config.json is a
Qwen3 config plus `block_size` (top level, or `dflash_config.block_size` in newer repos)
and `dflash_config.{mask_token_id, target_layer_ids}`.

It decodes in the **fill-in** layout (§2.5): the block `[anchor, mask x (B-1)]` yields B-1
drafts, slot k >= 1 predicting the token at anchor_pos + k; so it loads as our
`DFlashDrafter` with `anchor_first=False`, never as an anchor-first DeepSpec DFlash, even
though the tensors have the same names and shapes. z-lab itself drafts greedily and checks
drafts by exact match against target samples; our verifier rejection-samples with the
draft's own distribution, which stays lossless for any draft.

Not supported (error that names the key): sliding-window layers and the newer
`dflash_config` attention switches (`use_swa`, `causal`, `attention_sink_bias`), which only
later non-Qwen3 z-lab drafts use, and model types other than qwen3. The repo's remote code
is never executed; the export writes no `auto_map` (z-lab's `DFlashDraftModel.from_pretrained`
reads the directory directly, as its benchmark does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ascend_dspark.models.config import ModelConfig

from .config import DrafterConfig
from .dflash import DFlashDrafter
from .draft_dir import load_draft_dir, transformers_fields
from .export import check_plain_target, qwen3_draft_config, write_export

ZLAB_ARCHS = ("DFlashDraftModel",)
_UNSUPPORTED_SWITCHES = ("use_swa", "causal", "attention_sink_bias")


def zlab_default_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's taps when `dflash_config.target_layer_ids` is absent: one per draft layer,
    evenly from layer 1 to layer Lt - 3 (rounded), or the middle layer for a one-layer draft."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def zlab_drafter_config(raw: dict[str, Any], source: str = "config.json") -> DrafterConfig:
    """DrafterConfig (dflash, fill-in) from a z-lab config.json."""
    arch = (raw.get("architectures") or [None])[0]
    if arch not in ZLAB_ARCHS:
        raise ValueError(f"{source}: architecture {arch!r} is not a z-lab DFlash draft (expected DFlashDraftModel)")
    model_type = raw.get("model_type", "qwen3")
    if model_type != "qwen3":
        raise NotImplementedError(f"{source}: z-lab DFlash draft with model_type {model_type!r}; only qwen3 drafts "
                                  "are supported")
    dflash = raw.get("dflash_config")
    if not isinstance(dflash, dict):
        raise ValueError(f"{source}: no \"dflash_config\" object (z-lab's class reads mask_token_id and "
                         "target_layer_ids from it)")
    for key in _UNSUPPORTED_SWITCHES:
        if dflash.get(key):
            raise NotImplementedError(f"{source}: dflash_config.{key}={dflash[key]!r} is not supported")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types) or raw.get("use_sliding_window"):
        raise NotImplementedError(f"{source}: sliding-window draft layers (layer_types {layer_types}) are not "
                                  "supported; only full-attention z-lab drafts load")
    block_size = raw.get("block_size")
    if block_size is None:
        block_size = dflash.get("block_size")
    if block_size is None:
        raise ValueError(f"{source}: missing \"block_size\" (top level or in dflash_config)")
    if dflash.get("mask_token_id") is None:
        raise ValueError(f"{source}: missing dflash_config.mask_token_id (drafts older than z-lab commit 07b91ca "
                         "took it from the tokenizer's added <|MASK|> token: write that id there)")
    mc = ModelConfig.from_dict(raw)
    ids = dflash.get("target_layer_ids")
    if ids is None:
        if raw.get("num_target_layers") is None:
            raise ValueError(f"{source}: neither dflash_config.target_layer_ids nor num_target_layers is given")
        ids = zlab_default_layer_ids(int(raw["num_target_layers"]), mc.num_layers)
    return DrafterConfig(kind="dflash", target_layer_ids=list(ids), block_size=int(block_size), anchor_first=False,
                         mask_token_id=int(dflash["mask_token_id"]), **transformers_fields(mc))


def load_zlab_drafter(path: str | Path, target: nn.Module, dtype: torch.dtype | None = None) -> DFlashDrafter:
    """Load a z-lab DFlash draft directory (config.json + model.safetensors or sharded index) for `target`;
    the drafter shares the target's embedding and LM head."""
    return load_draft_dir(path, target, dtype, "z-lab DFlash draft", zlab_drafter_config)


def export_zlab_dflash(drafter: DFlashDrafter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a fill-in DFlash drafter in z-lab's format (config.json + model.safetensors, no
    embedding / LM head) into `path`. `dtype`: of every stored tensor (default: the drafter's)."""
    cfg = drafter.config
    if cfg.kind != "dflash" or cfg.anchor_first:
        raise ValueError(f"z-lab's DFlashDraftModel is a fill-in DFlash draft; this is a "
                         f"{'anchor-first ' if cfg.anchor_first else ''}{cfg.kind} drafter"
                         + (" (export it with export.export_deepspec)" if cfg.anchor_first else ""))
    if not cfg.qk_norm:
        raise ValueError("z-lab's DFlash layers always have q/k norms; this drafter has qk_norm=False")
    check_plain_target(drafter.target, "z-lab DFlash drafts")
    dtype = dtype or drafter.dtype
    raw = qwen3_draft_config(drafter, dtype)
    rope = dict(cfg.rope)                      # z-lab's configs (and its MLX loader) spell RoPE the transformers-4 way
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    raw.update(architectures=list(ZLAB_ARCHS), block_size=cfg.block_size,
               num_target_layers=drafter.target.config.num_layers,
               dflash_config={"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)},
               use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return write_export(path, raw, drafter.state_dict(), dtype)
