"""What the engine and the drafters may ask of a target model.

A target is an `nn.Module` decoder (Llama, Qwen3, Gemma3) running over a `PagedKVCache`:

    out = target(input_ids, positions, cache, slot_ids, valid, capture_layers=(1, 9, ...), ctx=ctx)

- input_ids [B, T] int64, right-padded; positions [B, T] int64 absolute positions;
  valid [B, T] bool (False = padding: computed but its K/V go to the scratch row);
  slot_ids [B] int64 cache slots. K/V of the valid tokens are written at their positions;
  each token attends causally to keys 0..position of its slot (sliding windows where the
  architecture has them). The forward never changes `cache.lengths`: the engine commits.
- `ctx` (ops.context.ForwardContext, optional): the forward's host facts for the ops (key
  columns to read, attention hints, the graph being captured); None reads the whole
  block table with no hints.
- `out.hidden` [B, T, H]: last-layer hidden states after the final norm.
- `out.features` [B, T, m*H] or None: the outputs of decoder layers `capture_layers`
  concatenated in the given order (id j = output of layer j, i.e. HF `hidden_states[j+1]`;
  -1 = the embedding output). For the last layer this is the output *before* the final
  norm, unlike HF's last `hidden_states` entry; drafters never tap the last layer.
- `target.logits(hidden)` -> [..., V] float32 logits (LM head, soft-capping if any).
- `target.embed(input_ids)` -> [..., H] input embeddings (Gemma's sqrt(H) scale included);
  drafters share it and the LM head instead of keeping copies.
- `target.config` is a `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardOutput:
    hidden: torch.Tensor
    features: torch.Tensor | None = None
