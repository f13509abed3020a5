"""Hyper-parameters of a drafter, independent of the checkpoint format it came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KINDS = ("eagle3", "dflash", "dspark")
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")     # DeepSpec `markov_head_type` values (case-insensitive)


@dataclass
class DrafterConfig:
    kind: str                              # "eagle3" | "dflash" | "dspark"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int                        # must equal the target's (embedding / LM head are shared)
    target_layer_ids: list[int]            # id j = output of target layer j; -1 = embedding output
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    qk_norm: bool = True                   # Qwen3-style per-head RMSNorm on q and k
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    # Block drafters (dflash, dspark).
    block_size: int = 0                    # slots per block: [anchor, mask x (block_size - 1)]
    anchor_first: bool = True              # True: slot k predicts anchor_pos+1+k (block_size drafts);
                                           # False: fill-in, slot k>=1 predicts anchor_pos+k (block_size-1 drafts)
    mask_token_id: int = 0
    # DSpark heads.
    markov_rank: int = 0                   # 0 = no Markov head
    markov_head_type: str = "vanilla"      # "vanilla" | "gated" | "rnn" (ops/markov.py has the maths)
    confidence_head: bool = False
    confidence_head_with_markov: bool = True
    # Eagle3.
    ttt_length: int = 7                    # most tokens one Eagle3 proposal chains

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown drafter kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        self.target_layer_ids = [int(j) for j in self.target_layer_ids]
        if not self.target_layer_ids:
            raise ValueError("target_layer_ids is empty: a drafter needs at least one target layer")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"drafter {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.kind in ("dflash", "dspark"):
            if self.block_size < (1 if self.anchor_first else 2):
                raise ValueError(f"block_size {self.block_size} is too small for a {self.kind} drafter "
                                 f"({'anchor-first' if self.anchor_first else 'fill-in'} layout)")
            if not 0 <= self.mask_token_id < self.vocab_size:
                raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")
        if self.kind == "dspark" and not self.anchor_first:
            raise ValueError("a dspark drafter uses the anchor-first block layout (anchor_first=True)")
        if self.kind == "eagle3":
            if self.num_layers != 1:
                raise ValueError(f"an eagle3 drafter has exactly one decoder layer, got num_layers={self.num_layers}")
            if self.ttt_length < 1:
                raise ValueError(f"ttt_length must be >= 1, got {self.ttt_length}")
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0, got {self.markov_rank}")
        self.markov_head_type = str(self.markov_head_type).lower()
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"unknown markov_head_type {self.markov_head_type!r}; expected one of "
                             f"{', '.join(MARKOV_HEAD_TYPES)}")
        if self.markov_head_type != "vanilla" and self.markov_rank == 0:
            raise ValueError(f"markov_head_type {self.markov_head_type!r} needs a Markov head (markov_rank > 0)")

    @property
    def max_draft_tokens(self) -> int:
        if self.kind == "eagle3":
            return self.ttt_length
        return self.block_size if self.anchor_first else self.block_size - 1

    @property
    def confidence_input_size(self) -> int:
        with_markov = self.confidence_head_with_markov and self.markov_rank > 0
        return self.hidden_size + (self.markov_rank if with_markov else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DrafterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown drafter config keys: {', '.join(unknown)}")
        return cls(**raw)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}
