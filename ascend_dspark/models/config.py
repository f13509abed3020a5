"""Architecture hyper-parameters read from a transformers config.json.

One flat dataclass covers Llama, Qwen3 and Gemma3; the differences are flags
(q/k norm, Gemma's (1 + w) norms, sandwich norms, embedding scale, sliding windows).
Missing keys fall back to transformers' own config-class defaults, and both RoPE
spellings (`rope_parameters` in transformers 5, `rope_theta`/`rope_scaling` before) load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED = ("llama", "qwen3", "gemma3_text")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    qk_norm: bool = False                 # Qwen3, Gemma3: RMSNorm per head on q and k
    norm_offset: float = 0.0              # Gemma: x * (1 + w)
    sandwich_norm: bool = False           # Gemma3: post-attention and pre/post-FFN norms
    embed_scale: float = 1.0              # Gemma: sqrt(hidden_size)
    attn_scale: float = 0.0               # softmax scale (0 -> head_dim ** -0.5)
    final_logit_softcap: float | None = None
    layer_types: list[str] = field(default_factory=list)      # "full_attention" / "sliding_attention"
    sliding_window: int | None = None
    rope: dict[str, dict[str, Any]] = field(default_factory=dict)   # layer type -> rope parameters
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json as read

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type == "gemma3":          # multimodal wrapper: use its text tower
            raw = {**raw.get("text_config", {}), "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
        full = _with_transformers_defaults(raw)
        hidden = full["hidden_size"]
        heads = full["num_attention_heads"]
        layers = full["num_hidden_layers"]
        gemma = model_type == "gemma3_text"
        layer_types = list(full.get("layer_types") or ["full_attention"] * layers)
        if len(layer_types) != layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for {layers} layers")
        eos = full.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=full["vocab_size"],
            hidden_size=hidden,
            intermediate_size=full["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=full.get("num_key_value_heads") or heads,
            head_dim=full.get("head_dim") or hidden // heads,
            rms_norm_eps=full["rms_norm_eps"],
            hidden_act=full.get("hidden_activation") or full.get("hidden_act") or "silu",
            tie_word_embeddings=bool(full.get("tie_word_embeddings", False)),
            attention_bias=bool(full.get("attention_bias", False)),
            max_position_embeddings=full.get("max_position_embeddings", 8192),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norm=gemma,
            embed_scale=math.sqrt(hidden) if gemma else 1.0,
            attn_scale=full["query_pre_attn_scalar"] ** -0.5 if gemma else 0.0,
            final_logit_softcap=full.get("final_logit_softcapping") if gemma else None,
            layer_types=layer_types,
            sliding_window=full.get("sliding_window") if "sliding_attention" in layer_types else None,
            rope=_rope_by_layer_type(full, layer_types),
            bos_token_id=full.get("bos_token_id"),
            eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos],
            raw=dict(raw),
        )


def _with_transformers_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill keys missing from config.json with the transformers config class defaults."""
    from transformers import AutoConfig

    hf = AutoConfig.for_model(**raw)
    return {**hf.to_dict(), **{k: v for k, v in raw.items() if k in ("layer_types",) and v}}


def _rope_by_layer_type(full: dict[str, Any], layer_types: list[str]) -> dict[str, dict[str, Any]]:
    """RoPE parameters per layer type, whatever spelling the config used."""
    params = full.get("rope_parameters")
    if params is None:                                     # transformers 4 spelling
        params = dict(full.get("rope_scaling") or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        params["rope_theta"] = full.get("rope_theta", 10000.0)
        if "rope_local_base_freq" in full:                 # Gemma3 before transformers 5
            return {"full_attention": params,
                    "sliding_attention": {"rope_type": "default", "rope_theta": full["rope_local_base_freq"]}}
    if all(isinstance(v, dict) for v in params.values()) and params:
        return {k: dict(v) for k, v in params.items()}
    return {t: dict(params) for t in set(layer_types)}
