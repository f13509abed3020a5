"""Inverse RoPE frequencies for a layer type: plain RoPE here, scaled variants from transformers."""

from __future__ import annotations

from typing import Any

import torch


def inverse_frequencies(rope: dict[str, Any], head_dim: int, raw_config: dict[str, Any],
                        layer_type: str) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2], attention scaling) for one layer type, on the CPU.

    Always computed on the CPU, even when the model is built under `torch.device("meta")`
    (the loader does): these buffers are not in the checkpoint, so they must be real.
    """
    with torch.device("cpu"):
        return _inverse_frequencies(rope, head_dim, raw_config, layer_type)


def _inverse_frequencies(rope: dict[str, Any], head_dim: int, raw_config: dict[str, Any],
                         layer_type: str) -> tuple[torch.Tensor, float]:
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = float(rope["rope_theta"])
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base ** exponent), 1.0
    # Scaled RoPE (linear, dynamic, yarn, llama3, ...): transformers owns the formulas.
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    hf_config = AutoConfig.for_model(**raw_config)
    # Per-layer-type parameters (Gemma3) are looked up by layer type; flat ones (Llama,
    # Qwen3) must be asked for without one, or transformers indexes them by the type name.
    params = getattr(hf_config, "rope_parameters", None) or {}
    kwargs = {"layer_type": layer_type} if isinstance(params.get(layer_type), dict) else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scaling)
