"""Llama / Qwen3 / Gemma3 decoder over the paged KV cache, written on ops/.

Module and parameter names mirror transformers (`model.layers.{i}.self_attn.q_proj`, ...)
so HF safetensors load with a strict `load_state_dict`. The forward contract is described
in `models/base.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ops
from ascend_dspark.cache import PagedKVCache, StepMeta
from ops.context import ForwardContext
from ops.registry import DEVICE_DEFAULTS, OpRegistry

from .base import ForwardOutput
from .config import ModelConfig
from .merged import MergedLinear, keep_part_names
from .parallel import row_parallel
from .rope import inverse_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, registry: OpRegistry = DEVICE_DEFAULTS) -> torch.Tensor:
        return registry.rms_norm(x, self.weight, self.eps, self.offset)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor,
                     registry: OpRegistry = DEVICE_DEFAULTS) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one fused op."""
        return registry.add_rms_norm(x, residual, self.weight, self.eps, self.offset)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd, bias = cfg.head_dim, cfg.attention_bias
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q_proj": cfg.num_heads * hd, "k_proj": cfg.num_kv_heads * hd,
                                                       "v_proj": cfg.num_kv_heads * hd}, bias)
        keep_part_names(self, "qkv_proj")
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
        self.cfg = cfg
        self.tp = None                  # a TensorParallelGroup once sharded (models/parallel.py)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: StepMeta, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        reg = meta.ctx.ops
        q, k, v = (p.view(b, t, -1, hd) for p in self.qkv_proj(x, reg))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q, reg), self.k_norm(k, reg)
        q, k = reg.apply_rotary(q, cos, sin), reg.apply_rotary(k, cos, sin)
        reg.kv_write(k_cache, v_cache, k, v, meta.slot_mapping)
        out = reg.attention(q, k_cache, v_cache, meta.block_table, mask, self.cfg.scale, meta.ctx)
        return row_parallel(reg, out.reshape(b, t, -1), self.o_proj, self.tp)


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate_proj": cfg.intermediate_size,
                                                           "up_proj": cfg.intermediate_size}, bias=False)
        keep_part_names(self, "gate_up_proj")
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        if cfg.hidden_act in ("silu", "swish"):
            self.act = "silu_and_mul"
        elif cfg.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = "gelu_tanh_and_mul"
        else:
            raise ValueError(f"unsupported hidden activation {cfg.hidden_act!r}")
        self.tp = None

    def forward(self, x: torch.Tensor, registry: OpRegistry = DEVICE_DEFAULTS) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, registry)
        return row_parallel(registry, getattr(registry, self.act)(gate, up), self.down_proj, self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.sandwich = cfg.sandwich_norm

    def forward(self, x, cos, sin, k_cache, v_cache, meta, mask) -> torch.Tensor:
        reg = meta.ctx.ops
        attn = self.self_attn(self.input_layernorm(x, reg), cos, sin, k_cache, v_cache, meta, mask)
        if self.sandwich:
            normed, x = self.pre_feedforward_layernorm.add_and_norm(self.post_attention_layernorm(attn, reg), x, reg)
            return x + self.post_feedforward_layernorm(self.mlp(normed, reg), reg)
        normed, x = self.post_attention_layernorm.add_and_norm(attn, x, reg)
        return x + self.mlp(normed, reg)


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class DecoderModel(nn.Module):
    """A causal decoder with HF parameter names: `model.*` and `lm_head`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for layer_type in sorted(set(cfg.layer_types)):
            inv_freq, scaling = inverse_frequencies(cfg.rope[layer_type], cfg.head_dim, cfg.raw, layer_type)
            self.register_buffer(f"inv_freq_{layer_type}", inv_freq, persistent=False)
            setattr(self, f"rope_scaling_{layer_type}", scaling)
        # Tensor parallelism (models/parallel.py `shard_target`): the group, the first
        # vocabulary row this rank holds, and the KV heads its cache keeps.
        self.tp = None
        self.vocab_start = 0
        self.num_local_kv_heads = cfg.num_kv_heads

    # -- shared with drafters -------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            x = self.model.embed_tokens(input_ids)
        else:                           # vocabulary-parallel: this rank's rows, zeros elsewhere
            weight = self.model.embed_tokens.weight
            local = input_ids - self.vocab_start
            here = (local >= 0) & (local < weight.shape[0])
            x = F.embedding(local.clamp(0, weight.shape[0] - 1), weight)
            x = self.tp.sum_partials(torch.where(here.unsqueeze(-1), x, torch.zeros_like(x)))
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def logits(self, hidden: torch.Tensor, registry: OpRegistry = DEVICE_DEFAULTS) -> torch.Tensor:
        out = registry.linear(hidden, self.lm_head.weight)
        if self.tp is not None:         # vocabulary-parallel: every rank gets all the logits
            out = self.tp.gather_last_dim(out)[..., :self.config.vocab_size]
        out = out.float()
        cap = self.config.final_logit_softcap
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    def rotary(self, positions: torch.Tensor, layer_type: str, dtype: torch.dtype):
        """cos, sin [B, T, head_dim] for the given positions (drafters reuse it)."""
        return ops.rotary_cos_sin(getattr(self, f"inv_freq_{layer_type}"), positions,
                                  getattr(self, f"rope_scaling_{layer_type}"), dtype)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                slot_ids: torch.Tensor, valid: torch.Tensor,
                capture_layers: tuple[int, ...] = (), ctx: ForwardContext | None = None) -> ForwardOutput:
        cfg = self.config
        meta = cache.address(slot_ids, positions, valid, ctx)
        x = self.embed(input_ids)
        dtype = x.dtype
        rope = {t: self.rotary(positions, t, dtype) for t in set(cfg.layer_types)}
        masks: dict[int | None, torch.Tensor] = {}
        captured: dict[int, torch.Tensor] = {-1: x} if -1 in capture_layers else {}
        for i, layer in enumerate(self.model.layers):
            window = cfg.window(i)
            if window not in masks:
                masks[window] = ops.build_attention_mask(positions, positions + 1, meta.num_keys, window)
            cos, sin = rope[cfg.layer_types[i]]
            x = layer(x, cos, sin, cache.k[i], cache.v[i], meta, masks[window])
            if i in capture_layers:
                captured[i] = x
        features = torch.cat([captured[j] for j in capture_layers], dim=-1) if capture_layers else None
        return ForwardOutput(hidden=self.model.norm(x, meta.ctx.ops), features=features)
