"""Rotary position embedding, neox ("rotate half") layout, optional partial rotary."""

from __future__ import annotations

import torch

from .registry import dispatching


def rotary_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float = 1.0,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [*positions.shape, rotary_dim] (frequencies repeated twice)."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dispatching("apply_rotary")
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B, T, R] (R <= D; the tail D-R passes through)."""
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
