"""Write drafters in DeepSpec's export format (shared/specs/checkpoint-formats.md §1.3-1.6).

A DeepSpec draft directory is what its trainer's `save_pretrained` leaves: `config.json` =
the target's transformers config with the draft keys written over it, and one
`model.safetensors` holding the draft's **full** state dict under its module names,
including frozen copies of the target's input embedding (`embed_tokens.weight`) and output
head (`lm_head.weight`; for a tied target the same matrix again), all in one dtype.
- `Qwen3DSparkModel`: DSpark (any `markov_head_type`) and DeepSpec's DFlash (a DFlash
  drafter in the anchor-first layout: markov_rank 0, no confidence head).
- `Qwen3Eagle3Model`: one-layer EAGLE-3 on exactly 5 tapped target layers.
Only what DeepSpec's classes can express is written; anything else (fill-in layout, no q/k
norm, a target whose embedding is scaled or whose logits are soft-capped, tap lists DeepSpec
rejects) is refused with the reason, since the file would decode differently there.
`drafters/deepspec.py` loads the result back; z-lab's format lives in `drafters/zlab.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Drafter
from .draft_dir import CONFIG_FILE
from .weights import write_weights

NUM_ANCHORS = 512            # DeepSpec's training-only anchors per sequence; its model class requires the key
STEP_LOSS_DECAY = 0.8        # DeepSpec's EAGLE-3 training value; its config builder requires the key
# Keys of the target's config that the draft config rewrites or that would misdescribe the draft.
_DROPPED = ("architectures", "auto_map", "rope_theta", "rope_scaling", "rope_parameters", "layer_types", "dtype",
            "torch_dtype", "_attn_implementation", "sliding_window", "use_sliding_window", "max_window_layers",
            "text_config", "quantization_config")


def export_deepspec(drafter: Drafter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `drafter` as a DeepSpec export (config.json + model.safetensors) into `path`.

    `dtype`: the one dtype of every stored tensor (default: the drafter's; DeepSpec's own
    releases are bfloat16). Returns `path`.
    """
    dtype = dtype or drafter.dtype
    config = deepspec_config(drafter, dtype)
    state = {k: v for k, v in drafter.state_dict().items()}
    state["embed_tokens.weight"], state["lm_head.weight"] = target_embedding_and_head(drafter.target)
    return write_export(path, config, state, dtype)


def deepspec_config(drafter: Drafter, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the DeepSpec export: the target's config + the draft's keys (§1.3)."""
    cfg, target = drafter.config, drafter.target
    check_plain_target(target, "DeepSpec's Qwen3 draft classes")
    if not cfg.qk_norm:
        raise ValueError("DeepSpec's Qwen3 draft layers always have q/k norms; this drafter has qk_norm=False")
    ids = list(cfg.target_layer_ids)
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"DeepSpec requires strictly increasing target_layer_ids, got {ids}")
    lt = target.config.num_layers
    raw = qwen3_draft_config(drafter, dtype)
    raw["rope_parameters"] = dict(cfg.rope)
    raw.update(num_target_layers=lt, target_layer_ids=ids)
    if cfg.kind == "eagle3":
        if len(ids) != 5 or min(ids) < 0:
            raise ValueError(f"DeepSpec's Qwen3Eagle3Model taps exactly 5 target layers >= 0, got {ids}")
        raw.update(architectures=["Qwen3Eagle3Model"], draft_num_hidden_layers=1, ttt_length=cfg.ttt_length,
                   step_loss_decay=STEP_LOSS_DECAY,
                   target_model_name_or_path=str(target.config.raw.get("_name_or_path") or ""))
        return raw
    if not cfg.anchor_first:
        raise ValueError("DeepSpec's Qwen3DSparkModel uses the anchor-first block layout; this drafter is fill-in "
                         "(z-lab DFlash): export it with zlab.export_zlab_dflash, or build it with anchor_first=True")
    markov = cfg.markov_rank if cfg.kind == "dspark" else 0
    confidence = cfg.kind == "dspark" and cfg.confidence_head
    raw.update(architectures=["Qwen3DSparkModel"], block_size=cfg.block_size, mask_token_id=cfg.mask_token_id,
               num_anchors=NUM_ANCHORS, markov_rank=markov, enable_confidence_head=confidence)
    if markov > 0:
        raw["markov_head_type"] = cfg.markov_head_type
    if confidence:
        raw["confidence_head_with_markov"] = bool(cfg.confidence_head_with_markov and markov > 0)
    return raw


def qwen3_draft_config(drafter: Drafter, dtype: torch.dtype) -> dict[str, Any]:
    """The target's config.json with the draft's Qwen3 hyper-parameters written over it
    (no RoPE keys: each format spells RoPE its own way)."""
    cfg = drafter.config
    raw = {k: v for k, v in drafter.target.config.raw.items() if k not in _DROPPED}
    raw.update(model_type="qwen3", hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
               rms_norm_eps=cfg.rms_norm_eps, hidden_act=cfg.hidden_act, attention_bias=cfg.attention_bias,
               layer_types=["full_attention"] * cfg.num_layers, tie_word_embeddings=False,
               dtype=str(dtype).removeprefix("torch."))
    return raw


def check_plain_target(target: nn.Module, who: str) -> None:
    """Refuse targets whose embedding is scaled or whose logits are soft-capped (Gemma): the
    exported draft would embed / score differently outside this project."""
    tc = target.config
    if tc.embed_scale != 1.0 or tc.final_logit_softcap:
        raise ValueError(f"{who} embed with the plain target embedding and score with the plain LM head, but this "
                         f"{tc.model_type} target scales its embedding ({tc.embed_scale:g}) or soft-caps its logits "
                         f"({tc.final_logit_softcap}); the exported draft would decode differently")


def target_embedding_and_head(target: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's input embedding and output head matrices [V, H] (the same one when tied)."""
    try:
        return target.model.embed_tokens.weight, target.lm_head.weight
    except AttributeError as exc:
        raise ValueError(f"target {type(target).__name__} exposes no model.embed_tokens / lm_head to copy into "
                         "the export") from exc


def write_export(path: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> Path:
    """config.json + one model.safetensors (every tensor in `dtype`, own storage, on the CPU;
    metadata {"format": "pt"} as transformers writes it)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous().clone() for k, v in state.items()}
    write_weights(path, tensors, {"format": "pt"})
    return path
