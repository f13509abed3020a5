"""Tiny targets and helpers for the drafter tests (CPU, float64 where numbers are compared).

A plain module (not conftest.py) so test files can import it by name."""

from __future__ import annotations

import torch
import transformers

from ascend_dspark.cache import PagedKVCache
from ascend_dspark.models.config import ModelConfig
from ascend_dspark.models.decoder import DecoderModel
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams, exponential_race

CPU = torch.device("cpu")

TINY_QWEN3 = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=512,
                  tie_word_embeddings=False)


def tiny_qwen3_config(**overrides) -> dict:
    return transformers.Qwen3Config(**{**TINY_QWEN3, **overrides}).to_dict()


def scramble(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Re-initialise every parameter (norm weights around 1) so numbers carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)
    return module


def make_target(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> DecoderModel:
    target = DecoderModel(ModelConfig.from_dict(tiny_qwen3_config(**overrides)))
    scramble(target, seed, std=0.2)
    return target.to(dtype).eval()


def greedy(batch: int) -> SamplingBatch:
    return SamplingBatch([SamplingParams(temperature=0.0) for _ in range(batch)], CPU)


class SoftmaxSampling:
    """The `SamplingBatch` interface at temperature 1 with no filters.

    `forced`: optional list of [B] token tensors returned by successive `sample` calls
    (lets a test choose the token a sequential drafter conditions on).
    """

    all_greedy = False

    def __init__(self, batch: int, seed: int = 7, forced: list[torch.Tensor] | None = None) -> None:
        self.seeds = torch.arange(batch, dtype=torch.long) + seed
        self.forced = list(forced) if forced else []
        self.calls = 0

    def draw(self, logits: torch.Tensor, positions: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probs(logits)
        return probs, self.sample(probs, positions, stream)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def sample(self, probs: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
        self.calls += 1
        if self.forced:
            return self.forced.pop(0)
        return exponential_race(probs, self.seeds, positions, stream)


def random_features(drafter, batch: int, length: int, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    width = len(drafter.target_layer_ids) * drafter.config.hidden_size
    return (scale * torch.randn(batch, length, width, generator=gen, dtype=torch.float64)).to(drafter.dtype)


def prefill_features(target: DecoderModel, prompt: torch.Tensor, layer_ids) -> torch.Tensor:
    """Target features [1, T, m*H] of a prompt, through the real target forward."""
    cfg = target.config
    dtype = next(target.parameters()).dtype
    cache = PagedKVCache.contiguous(cfg.num_layers, 1, 64, cfg.num_kv_heads, cfg.head_dim, dtype, CPU)
    t = prompt.shape[1]
    out = target(prompt, torch.arange(t).unsqueeze(0), cache, torch.zeros(1, dtype=torch.long),
                 torch.ones(1, t, dtype=torch.bool), capture_layers=tuple(layer_ids))
    return out.features
