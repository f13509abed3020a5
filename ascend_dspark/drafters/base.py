"""The drafter protocol: what the engine asks of Eagle3, DFlash and DSpark drafters.

Conventions (absolute positions, shared with the target):
- `observe` receives the target features of positions p..p+counts-1 (right-padded to T)
  and, for each, the committed token that follows it (`next_tokens[b, i]` is the token at
  `positions[b, i] + 1`). The engine calls it after prefill (all prompt positions) and
  after every verification (the anchor and the accepted drafts; the next tokens are the
  accepted drafts and the correction/bonus token, which becomes the new anchor). After it
  the drafter's cache length for the slot is the last observed position + 1.
- `propose` receives the anchor (the last committed token, at `anchor_positions`, not yet
  seen by the target) and returns `num_tokens` drafts: draft k is for position
  `anchor_pos + 1 + k`, drawn from `probs[:, k]` with `Stream.DRAFT` noise at that position.
  A proposal never changes the drafter's cache lengths: scratch K/V it writes at positions
  >= anchor_pos are invisible to later proposals and overwritten by the next `observe`.

The drafter shares the target's token embedding and LM head: it keeps a reference to the
target that is not a submodule (not in its `state_dict()` / `parameters()`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import ops
from ascend_dspark.cache import BlockTables, PagedKVCache
from ascend_dspark.spec.sampling import SamplingBatch
from ops.context import ForwardContext
from ops.registry import DEVICE_DEFAULTS, OpRegistry

from .config import DrafterConfig


@dataclass
class DraftProposal:
    tokens: torch.Tensor                 # [B, K] int64; token k is for position anchor_pos + 1 + k
    probs: torch.Tensor                  # [B, K, V] float32: the distribution token k was drawn from
    confidence: torch.Tensor | None = None   # [B, K] float32 in (0, 1): P(k accepted | all < k accepted)


class Drafter(nn.Module):
    """Base class; subclasses implement `observe` and `propose`."""

    kind: str = ""

    def __init__(self, cfg: DrafterConfig, target: nn.Module) -> None:
        super().__init__()
        validate_against_target(cfg, target)
        self.config = cfg
        self._target_ref = (target,)          # a tuple is not registered as a submodule
        self.target_layer_ids: tuple[int, ...] = tuple(cfg.target_layer_ids)
        self.max_draft_tokens: int = cfg.max_draft_tokens
        self.cache: PagedKVCache | None = None
        self._rope_from_target = _rope_matches_target(cfg, target)
        if not self._rope_from_target:
            rope_type = cfg.rope.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(
                    f"drafter RoPE {cfg.rope} differs from the target's full-attention RoPE "
                    f"{_target_rope(target)}; only plain ('default') RoPE can differ from the target's")
            exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
            self.register_buffer("inv_freq", 1.0 / (float(cfg.rope["rope_theta"]) ** exponent), persistent=False)

    # -- shared with the target ---------------------------------------------------------------
    @property
    def target(self) -> nn.Module:
        return self._target_ref[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed(ids).to(self.dtype)

    def logits(self, hidden: torch.Tensor, registry: OpRegistry = DEVICE_DEFAULTS) -> torch.Tensor:
        """float32 logits through the target's LM head (and soft-capping, if any)."""
        return self.target.logits(hidden.to(_param_dtype(self.target, hidden.dtype)), registry)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_from_target:
            return self.target.rotary(positions, "full_attention", dtype)
        return ops.rotary_cos_sin(self.inv_freq, positions, 1.0, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def lookahead(self) -> int:
        """Positions at or after anchor_pos that one proposal writes as scratch K/V: allocate()'s
        capacity must be at least the highest anchor position plus this."""
        raise NotImplementedError

    # -- cache --------------------------------------------------------------------------------
    def allocate(self, num_slots: int, capacity: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Standalone caches where every slot owns `capacity` positions: it must cover the
        highest position plus one block / chain of drafts."""
        device = torch.device(device) if device is not None else self.device
        self.attach(BlockTables.contiguous(num_slots, capacity, device), dtype)

    def attach(self, tables: BlockTables, dtype: torch.dtype | None = None) -> None:
        """K/V over the engine's block tables: the drafter's entries for a position live in the
        blocks of the same ids as the target's, so one allocator serves both."""
        cfg = self.config
        self.cache = PagedKVCache(cfg.num_layers, tables, cfg.num_kv_heads, cfg.head_dim, dtype or self.dtype)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        cfg = self.config
        return PagedKVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim,
                                            dtype or self.dtype)

    def reset(self, slot_ids: torch.Tensor) -> None:
        self._require_cache().reset(slot_ids)

    def _require_cache(self) -> PagedKVCache:
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}: call allocate(num_slots, capacity, dtype, device) or attach(tables) first")
        return self.cache

    def _commit_lengths(self, slot_ids: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor) -> None:
        """Cache length of each slot = last observed position + 1 (unchanged where counts == 0)."""
        cache = self._require_cache()
        last = positions.gather(1, (counts - 1).clamp(min=0).unsqueeze(1)).squeeze(1) + 1
        cache.lengths[slot_ids] = torch.where(counts > 0, last, cache.lengths[slot_ids])

    def _check_features(self, features: torch.Tensor) -> None:
        want = len(self.target_layer_ids) * self.config.hidden_size
        if features.shape[-1] != want:
            raise ValueError(f"{type(self).__name__}: features have width {features.shape[-1]}, expected "
                             f"{len(self.target_layer_ids)} target layers x hidden {self.config.hidden_size} = {want}")

    def _check_num_tokens(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= self.max_draft_tokens:
            raise ValueError(f"{type(self).__name__}: num_tokens={num_tokens} is outside 0..max_draft_tokens="
                             f"{self.max_draft_tokens}")

    def _empty_proposal(self, anchors: torch.Tensor) -> DraftProposal:
        b, dev = anchors.shape[0], anchors.device
        conf = torch.zeros(b, 0, device=dev) if self.config.confidence_head else None
        return DraftProposal(tokens=torch.zeros(b, 0, dtype=torch.long, device=dev),
                             probs=torch.zeros(b, 0, self.config.vocab_size, device=dev), confidence=conf)

    # -- protocol -----------------------------------------------------------------------------
    def observe(self, slot_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                next_tokens: torch.Tensor, counts: torch.Tensor, ctx: ForwardContext | None = None) -> None:
        raise NotImplementedError

    def propose(self, slot_ids: torch.Tensor, anchors: torch.Tensor, anchor_positions: torch.Tensor,
                num_tokens: int, sampling: SamplingBatch, ctx: ForwardContext | None = None) -> DraftProposal:
        raise NotImplementedError


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else default


def _target_rope(target: nn.Module) -> dict | None:
    rope = getattr(target.config, "rope", {}) or {}
    return rope.get("full_attention")


def _rope_matches_target(cfg: DrafterConfig, target: nn.Module) -> bool:
    return (cfg.head_dim == target.config.head_dim and hasattr(target, "rotary")
            and _normalise_rope(cfg.rope) == _normalise_rope(_target_rope(target)))


def _normalise_rope(rope: dict | None) -> dict | None:
    if rope is None:
        return None
    out = {k: v for k, v in rope.items() if v is not None}
    out.setdefault("rope_type", "default")
    if "rope_theta" in out:
        out["rope_theta"] = float(out["rope_theta"])
    return out


def validate_against_target(cfg: DrafterConfig, target: nn.Module) -> None:
    """The checks that make a drafter and a target a valid pair; errors name the mismatch."""
    tc = target.config
    if cfg.hidden_size != tc.hidden_size:
        raise ValueError(f"drafter hidden_size {cfg.hidden_size} != target hidden_size {tc.hidden_size}: the "
                         "drafter shares the target's embedding and LM head, so they must match")
    if cfg.vocab_size != tc.vocab_size:
        raise ValueError(f"drafter vocab_size {cfg.vocab_size} != target vocab_size {tc.vocab_size}")
    validate_target_layer_ids(cfg.target_layer_ids, tc.num_layers)


def validate_target_layer_ids(ids, num_target_layers: int) -> None:
    for j in ids:
        if j == num_target_layers - 1:
            raise ValueError(f"target_layer_ids {list(ids)} contains {j}, the last target layer: its output is "
                             "the final-norm input that drafters were never trained on; use layers < "
                             f"{num_target_layers - 1}")
        if not -1 <= j < num_target_layers - 1:
            raise ValueError(f"target_layer_ids {list(ids)}: {j} is out of range for a target with "
                             f"{num_target_layers} layers (valid: -1 for the embedding output, 0..{num_target_layers - 2})")
