"""Gated MLP activations on a concatenated [gate ; up] tensor or a separate pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import dispatching


@dispatching("silu_and_mul")
def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up (Llama, Qwen3)."""
    return F.silu(gate) * up


@dispatching("gelu_tanh_and_mul")
def gelu_tanh_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh approximation (Gemma3's gelu_pytorch_tanh)."""
    return F.gelu(gate, approximate="tanh") * up
