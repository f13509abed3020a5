"""Building blocks shared by the drafters, written on ops/.

Parameter names follow DeepSpec / transformers (`self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, ...) so published checkpoints map by identity.
"""

from __future__ import annotations

import torch
from torch import nn

from ascend_dspark.cache import StepMeta
from ascend_dspark.models.decoder import GatedMLP, RMSNorm  # noqa: F401  (re-used: DrafterConfig has the same fields)
from ops.registry import DEVICE_DEFAULTS, OpRegistry

from .config import DrafterConfig


class SelfAttention(nn.Module):
    """q/k/v/o projections with optional per-head q/k RMSNorm; the attention op runs on the paged cache."""

    def __init__(self, cfg: DrafterConfig, input_size: int) -> None:
        super().__init__()
        hd, bias = cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(input_size, cfg.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(input_size, cfg.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(input_size, cfg.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.head_dim = hd
        self.scale = hd ** -0.5

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              registry: OpRegistry = DEVICE_DEFAULTS) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q, registry)
        return registry.apply_rotary(q, cos, sin)

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  registry: OpRegistry = DEVICE_DEFAULTS) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        if self.qk_norm:
            k = self.k_norm(k, registry)
        return registry.apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: StepMeta, mask: torch.Tensor) -> torch.Tensor:
        """Write this chunk's K/V at its rows, then attend over the paged cache under `mask`."""
        reg = meta.ctx.ops
        q = self.query(x, cos, sin, reg)
        k, v = self.key_value(x, cos, sin, reg)
        reg.kv_write(k_cache, v_cache, k, v, meta.slot_mapping)
        out = reg.attention(q, k_cache, v_cache, meta.block_table, mask, self.scale, meta.ctx)
        return self.o_proj(out.reshape(*x.shape[:2], -1))


def init_weights(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """HF-style initialisation, reproducible: N(0, std) for Linear/Embedding weights, zero biases, unit norms."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if isinstance(_owner(module, name), RMSNorm):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def _owner(module: nn.Module, name: str) -> nn.Module:
    path = name.rsplit(".", 1)[0] if "." in name else ""
    return module.get_submodule(path) if path else module
