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
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import IntEnum

import torch

_M32 = 0xFFFFFFFF


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
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x, c < 2**32 without overflowing int64."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (lowbias32), on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Per (request, position) 32-bit key; seeds [B], positions [B, ...]."""
    lo = (seeds & _M32).view(-1, *([1] * (positions.dim() - 1)))
    hi = ((seeds >> 32) & _M32).view_as(lo)
    h = _mix32(hi ^ _mix32(torch.full_like(hi, (int(stream) * 0x9E3779B9) & _M32)))
    h = _mix32(lo ^ h)
    return _mix32(h ^ (positions & _M32))


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hash -> float32 uniform in (0, 1), never 0 and never 1.

    23 random bits, so (k + 0.5) / 2**23 is exact in float32: with 24 bits the largest
    value rounds to 1.0, and an exponential race then divides by -log(1) = 0."""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """One U(0,1) per (request, position): shape of `positions`."""
    return _to_unit(_mix32(_key(seeds, positions, stream)))


def uniform_vocab(seeds: torch.Tensor, positions: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """U(0,1) per (request, position, token): shape [*positions.shape, vocab]."""
    key = _key(seeds, positions, stream).unsqueeze(-1)
    tokens = _mul32(torch.arange(vocab, device=positions.device, dtype=torch.long), 0x9E3779B1)
    return _to_unit(_mix32(key ^ tokens))


def exponential_race(weights: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                     stream: int) -> torch.Tensor:
    """Sample argmax(w / E), E ~ Exp(1): a draw from w / sum(w) (w >= 0, unnormalised ok)."""
    u = uniform_vocab(seeds, positions, stream, weights.shape[-1])
    return (weights.float() / -torch.log(u)).argmax(-1)


class SamplingBatch:
    """The sampling parameters of a batch as device tensors (one row per request)."""

    def __init__(self, params: list[SamplingParams], device: torch.device) -> None:
        self.size = len(params)
        self.device = device
        self.greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device)
        self.temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params],
                                        dtype=torch.float32, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        self.seeds = torch.tensor([p.seed if p.seed is not None else random.getrandbits(63) for p in params],
                                  dtype=torch.long, device=device)
        # Host-side flags, known when the batch is built: skip work nobody asked for.
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        self.use_top_k = any(p.top_k > 0 and not p.greedy for p in params)
        self.use_top_p = any(p.top_p < 1.0 and not p.greedy for p in params)
        self.use_min_p = any(p.min_p > 0.0 and not p.greedy for p in params)

    def select(self, rows: torch.Tensor, params: list[SamplingParams]) -> "SamplingBatch":
        """The sub-batch of `rows` (params: the matching SamplingParams, for host flags)."""
        sub = SamplingBatch.__new__(SamplingBatch)
        sub.__dict__.update(self.__dict__)
        for name in ("greedy", "temperature", "top_k", "top_p", "min_p", "seeds"):
            setattr(sub, name, getattr(self, name).index_select(0, rows))
        sub.size = rows.numel()
        sub.all_greedy = all(p.greedy for p in params)
        sub.any_greedy = any(p.greedy for p in params)
        sub.use_top_k = any(p.top_k > 0 and not p.greedy for p in params)
        sub.use_top_p = any(p.top_p < 1.0 and not p.greedy for p in params)
        sub.use_min_p = any(p.min_p > 0.0 and not p.greedy for p in params)
        return sub

    def _rows(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (like.dim() - 1)))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Distribution to sample from, float32 [B, ..., V]; one-hot for greedy rows."""
        logits = logits.float()
        if self.all_greedy:
            return _one_hot_argmax(logits)
        scaled = logits / self._rows(self.temperature, logits)
        if self.use_top_k or self.use_top_p:
            scaled = self._top_k_top_p(scaled)
        probs = torch.softmax(scaled, dim=-1)
        if self.use_min_p:
            floor = self._rows(self.min_p, probs) * probs.amax(-1, keepdim=True)
            probs = torch.where(probs >= floor, probs, torch.zeros_like(probs))
            probs = probs / probs.sum(-1, keepdim=True)
        if self.any_greedy:
            greedy = self._rows(self.greedy, logits)
            probs = torch.where(greedy, _one_hot_argmax(logits), probs)
        return probs

    def _top_k_top_p(self, logits: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        keep = torch.ones_like(sorted_logits, dtype=torch.bool)
        if self.use_top_k:
            k = self._rows(self.top_k, logits)
            k = torch.where(k > 0, k, torch.full_like(k, vocab))
            keep &= torch.arange(vocab, device=logits.device) < k
        if self.use_top_p:
            masked = sorted_logits.masked_fill(~keep, float("-inf"))
            sorted_probs = torch.softmax(masked, dim=-1)
            before = sorted_probs.cumsum(-1) - sorted_probs       # mass strictly above
            top_p = self._rows(self.top_p, logits)
            keep &= (before < top_p) | (top_p >= 1.0)     # top_p = 1 keeps all, despite rounding
        keep[..., 0] = True
        mask = torch.zeros_like(keep).scatter(-1, order, keep)
        return logits.masked_fill(~mask, float("-inf"))

    def sample(self, probs: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
        """Draw one token per (row, position) from probs [B, ..., V]; positions [B, ...]."""
        if self.all_greedy:
            return probs.argmax(-1)
        return exponential_race(probs, self.seeds, positions, stream)


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
