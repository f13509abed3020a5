"""Per-request sampling, vectorised over the batch.

Two pieces:
- `SamplingBatch.probs(logits)`: the distribution a request samples from, after
  temperature, top-k, top-p and min-p (in that order). Greedy requests (temperature 0)
  get a one-hot on the argmax, so the same verification maths covers both.
- Counter-based noise: every random number is a hash of (request seed, absolute token
  position, stream, vocabulary index). No torch.Generator, no host sync, no Python loop
  over requests, and a seeded request reproduces whatever batch it runs in. Sampling is
  an exponential race, argmax(p / E) with E ~ Exp(1), which draws exactly from p and
  avoids torch.multinomial (a host sync on NPU).

This module owns the request-level API (SamplingParams, SamplingBatch, the streams); the
tensor maths are ops in `ops.sampling` (apply_temperature_top_k_top_p, apply_min_p,
counter_uniform[_vocab], exponential_race), which device backends can replace.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from ops.registry import DEVICE_DEFAULTS, OpRegistry


MAX_LOGPROBS = 20


class Stream(IntEnum):
    """Independent random streams; one draw per (request, position, stream)."""

    DRAFT = 1     # drafter's proposal at a position
    ACCEPT = 2    # verifier's acceptance test at a position
    TARGET = 3    # verifier's residual / bonus sample at a position


@dataclass
class SamplingParams:
    """What a user asks for one request (OpenAI-style names)."""

    temperature: float = 1.0
    top_k: int = 0            # 0 = disabled
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # This request's cap on the tokens drafted and verified per step (the engine's K at most;
    # None: K). 0: no speculation. Checked here only: the server passes it through.
    num_speculative_tokens: int | None = None
    logprobs: int | None = None   # report the target's logprob of each token, and this many top alternatives
    # Also report the target's logprob of every prompt token after the first (and this many top
    # alternatives), from the prefill forward: what log-likelihood evaluations ask for.
    prompt_logprobs: int | None = None
    # Structured output: a `spec.grammar.CompiledGrammar` the output must follow (None: free text).
    # Compiled before the request reaches the engine (compiling is not the engine loop's work).
    grammar: object | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int,
            registry: OpRegistry = DEVICE_DEFAULTS) -> torch.Tensor:
    """One U(0,1) per (request, position): shape of `positions`."""
    return registry.counter_uniform(seeds, positions, int(stream))


def uniform_vocab(seeds: torch.Tensor, positions: torch.Tensor, stream: int, vocab: int,
                  registry: OpRegistry = DEVICE_DEFAULTS) -> torch.Tensor:
    """U(0,1) per (request, position, token): shape [*positions.shape, vocab]."""
    return registry.counter_uniform_vocab(seeds, positions, int(stream), vocab)


def exponential_race(weights: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                     stream: int, registry: OpRegistry = DEVICE_DEFAULTS) -> torch.Tensor:
    """Sample argmax(w / E), E ~ Exp(1): a draw from w / sum(w) (w >= 0, unnormalised ok)."""
    return registry.exponential_race(weights, uniform_vocab(seeds, positions, stream, weights.shape[-1], registry))


class SamplingBatch:
    """The sampling parameters of a batch as device tensors (one row per request).

    Greedy rows carry temperature 1 and top_k 1 in the tensors: their distribution is
    replaced by a one-hot anyway, and top-1 keeps `top_k_bounds` inside the range that
    fused top-k kernels accept (torch_npu: 1..1024). `ops`: the platform's op registry
    (its sampling and verification kernels).
    """

    TENSORS = ("greedy", "temperature", "top_k", "top_p", "min_p", "seeds")   # one row per request

    def __init__(self, params: list[SamplingParams], device: torch.device,
                 ops: OpRegistry = DEVICE_DEFAULTS) -> None:
        self.size = len(params)
        self.device = device
        self.ops = ops
        self.greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device)
        self.temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params],
                                        dtype=torch.float32, device=device)
        self.top_k = torch.tensor([1 if p.greedy else p.top_k for p in params], dtype=torch.long, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        self.seeds = torch.tensor([p.seed if p.seed is not None else random.getrandbits(63) for p in params],
                                  dtype=torch.long, device=device)
        self._set_host_flags(params)

    def _set_host_flags(self, params: list[SamplingParams]) -> None:
        """Host-side flags, known when the batch is built: skip work nobody asked for, and
        let op backends choose a kernel without reading parameters back from the device."""
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        self.use_top_k = any(p.top_k > 0 and not p.greedy for p in params)
        self.use_top_p = any(p.top_p < 1.0 and not p.greedy for p in params)
        self.use_min_p = any(p.min_p > 0.0 and not p.greedy for p in params)
        ks = [1 if p.greedy else p.top_k for p in params]
        self.top_k_bounds = (min(ks), max(ks)) if ks else None   # (min, max) of the top_k tensor

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Distribution to sample from, float32 [B, ..., V]; one-hot for greedy rows."""
        if self.all_greedy:
            return _one_hot_argmax(logits)
        scaled = self.ops.apply_temperature_top_k_top_p(
            logits, self.temperature, self.top_k if self.use_top_k else None,
            self.top_p if self.use_top_p else None, top_k_bounds=self.top_k_bounds)
        probs = torch.softmax(scaled, dim=-1)
        if self.use_min_p:
            probs = self.ops.apply_min_p(probs, self.min_p)
        if self.any_greedy:
            greedy = self.greedy.view(-1, *([1] * (logits.dim() - 1)))
            probs = torch.where(greedy, _one_hot_argmax(logits), probs)
        return probs

    def sample(self, probs: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
        """Draw one token per (row, position) from probs [B, ..., V]; positions [B, ...]."""
        if self.all_greedy:
            return probs.argmax(-1)
        return exponential_race(probs, self.seeds, positions, stream, self.ops)

    def draw(self, logits: torch.Tensor, positions: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(`probs(logits)`, `sample` of it): an all-greedy batch takes the argmax once, since the
        sample of a one-hot is its index (a drafter's step at T = 0 runs half the reductions)."""
        if self.all_greedy:
            tokens = logits.argmax(-1)
            return _one_hot(tokens, logits), tokens
        probs = self.probs(logits)
        return probs, self.sample(probs, positions, stream)


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return _one_hot(logits.argmax(-1), logits)


def _one_hot(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, dtype=torch.float32).scatter_(-1, tokens.unsqueeze(-1), 1.0)
