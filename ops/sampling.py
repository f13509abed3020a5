"""Sampling primitives: logit filters, min-p, counter-based noise and the exponential race.

The per-request parameters arrive as per-row tensors ([B], one row per request); logits
and probabilities are [B, ..., V] and a row's parameters apply to all its positions. What a
request asked for, and which rows are greedy, is `ascend_dspark.spec.sampling`'s business;
these ops only do the maths, on the device, without host syncs.

Counter-based noise: every random number is a hash of (seed, absolute position, stream,
vocabulary index), so no generator state exists and a seeded request reproduces whatever
batch (and whatever backend) it runs in. A backend replacing `counter_uniform` or
`counter_uniform_vocab` must therefore reproduce these bits exactly.
"""

from __future__ import annotations

import torch

from .registry import dispatching

_M32 = 0xFFFFFFFF
_P32 = 2 ** 32


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row tensor [B] viewed to broadcast against `like` [B, ..., V]."""
    return t.view(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------- logit / probability filters

TOP_K_KERNEL_LIMIT = 1024     # the largest k a fused top-k kernel takes (torch_npu's npu_top_k_top_p)


def top_k_bounds_class(bounds: tuple[int, int] | None) -> tuple[bool, bool] | None:
    """What of a batch's (min, max) top-k any backend's choice of kernel depends on: whether
    every k is >= 1 and <= TOP_K_KERNEL_LIMIT. Batches in one class run the same kernels,
    so a step graph keyed on the class (not the raw bounds) replays correctly for all."""
    return None if bounds is None else (bounds[0] >= 1, bounds[1] <= TOP_K_KERNEL_LIMIT)


@dispatching("top_k_top_p")
def apply_temperature_top_k_top_p(logits: torch.Tensor, temperature: torch.Tensor,
                                  top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                                  *, top_k_bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 logits / temperature, with the tokens outside top-k, then top-p, set to -inf.

    logits [B, ..., V] (any float dtype); temperature [B] (> 0); top_k [B] integer, 0 (or
    >= V) keeps every token of that row; top_p [B] in (0, 1], 1 keeps every token of that
    row (explicitly, not through a cumulative sum that may round below 1). `None` for
    top_k / top_p switches the filter off for every row (skips the sort when nobody asked).

    top-k keeps the k largest (ties at the k-th value broken arbitrarily); top-p then keeps
    the smallest prefix of the remaining tokens, in descending order, whose mass reaches
    top_p (a token is kept when the mass strictly above it is < top_p). The most likely
    token is always kept.

    top_k_bounds: (min, max) of top_k over the rows, known on the host when the batch was
    built. The reference ignores it; a backend whose kernel takes a limited range of k
    (torch_npu: 1..1024) uses it to choose without reading top_k back from the device.
    """
    scaled = logits.float() / _rows(temperature, logits)
    if top_k is None and top_p is None:
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = _rows(top_k, scaled)
        k = torch.where(k > 0, k, torch.full_like(k, vocab))
        keep &= torch.arange(vocab, device=scaled.device) < k
    if top_p is not None:
        masked = sorted_logits.masked_fill(~keep, float("-inf"))
        sorted_probs = torch.softmax(masked, dim=-1)
        before = sorted_probs.cumsum(-1) - sorted_probs          # mass strictly above
        p = _rows(top_p, scaled)
        keep &= (before < p) | (p >= 1.0)                        # top_p = 1 keeps all, despite rounding
    keep[..., 0] = True
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    return scaled.masked_fill(~mask, float("-inf"))


@dispatching("min_p")
def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens below min_p * (largest probability) and renormalise; float32 [B, ..., V].

    probs [B, ..., V] (normalised); min_p [B] in [0, 1). Rows with min_p = 0 are returned
    unchanged (no renormalisation round trip).
    """
    probs = probs.float()
    m = _rows(min_p, probs)
    floor = m * probs.amax(-1, keepdim=True)
    kept = torch.where(probs >= floor, probs, torch.zeros_like(probs))
    kept = kept / kept.sum(-1, keepdim=True)
    return torch.where(m > 0, kept, probs)


# ---------------------------------------------------------------- counter-based noise

# The hash runs on int64 tensors holding non-negative 32-bit values, written without bit
# shifts: x >> n is a floor division by 2**n, x << n a multiply, x & (2**n - 1) a remainder,
# and XOR is `torch.bitwise_xor`, never the `^` operator. Same bits, but every op has an
# aclnn kernel on each supported torch_npu line, where the int64 shifts (2.6-2.9 before the
# 26.0 builds) and `__xor__` (2.6.0) are acl_op-only, refused inside NPU graph capture
# (tests/platform/torch_npu_contracts/acl_op_only/).

def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.div(x, 2 ** n, rounding_mode="floor")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x, c < 2**32 without overflowing int64."""
    lo = x % 0x10000
    hi = _shr(x, 16)
    return (lo * c + ((hi * c) % 0x10000) * 0x10000) % _P32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (lowbias32), on int64 tensors holding 32-bit values."""
    x = torch.bitwise_xor(x, _shr(x, 16))
    x = _mul32(x, 0x7FEB352D)
    x = torch.bitwise_xor(x, _shr(x, 15))
    x = _mul32(x, 0x846CA68B)
    return torch.bitwise_xor(x, _shr(x, 16))


def _key(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Per (request, position) 32-bit key; seeds [B], positions [B, ...]."""
    lo = (seeds % _P32).view(-1, *([1] * (positions.dim() - 1)))
    hi = (_shr(seeds, 32) % _P32).view_as(lo)
    h = _mix32(torch.bitwise_xor(hi, _mix32(torch.full_like(hi, (int(stream) * 0x9E3779B9) & _M32))))
    h = _mix32(torch.bitwise_xor(lo, h))
    return _mix32(torch.bitwise_xor(h, positions % _P32))


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hash -> float32 uniform in (0, 1), never 0 and never 1.

    23 random bits, so (k + 0.5) / 2**23 is exact in float32: with 24 bits the largest
    value rounds to 1.0, and an exponential race then divides by -log(1) = 0."""
    return (_shr(h, 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


@dispatching("counter_uniform")
def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """One float32 U(0,1) per (request, position): seeds [B] int64, positions [B, ...] int64
    -> shape of `positions`."""
    return _to_unit(_mix32(_key(seeds, positions.long(), stream)))


@dispatching("counter_uniform_vocab")
def counter_uniform_vocab(seeds: torch.Tensor, positions: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """float32 U(0,1) per (request, position, token): shape [*positions.shape, vocab]."""
    key = _key(seeds, positions.long(), stream).unsqueeze(-1)
    tokens = _mul32(torch.arange(vocab, device=positions.device, dtype=torch.long), 0x9E3779B1)
    return _to_unit(_mix32(torch.bitwise_xor(key, tokens)))


# ---------------------------------------------------------------- sampling

@dispatching("exponential_race")
def exponential_race(weights: torch.Tensor, uniform_noise: torch.Tensor) -> torch.Tensor:
    """argmax(w / -log u) over the last dim: int64 [...], a draw from w / sum(w).

    weights [..., V] >= 0 (unnormalised is fine); uniform_noise [..., V] in (0, 1), one
    independent uniform per token (-log u ~ Exp(1)). No torch.multinomial: it forces a
    host sync on NPU.
    """
    return (weights.float() / -torch.log(uniform_noise)).argmax(-1)
