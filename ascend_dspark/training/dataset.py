"""Training samples from regenerated JSONL, and the deterministic, resumable batch order.

A sample is prompt + response token ids (the target's own regenerated response, see
`regen.py`) with `loss_mask` True exactly on the response tokens: drafts are trained to
predict what the target says, never the user's text or the chat template.

`BatchSampler` decides which samples form each step's batch. The order of epoch e is a
permutation seeded by (seed, e), and the sampler's state is (epoch, position), so a run
resumed from a checkpoint sees exactly the batches the uninterrupted run would have.
With world_size ranks, one *global* batch is batch_size * world_size samples, laid out as
if one process read it; rank r takes the contiguous slice [r*batch_size, (r+1)*batch_size).
Every global batch is full (the epoch's remainder is dropped), so all ranks step in lockstep.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .regen import read_records
from .shards import base_prompt_id, iter_shard_records, prompt_key

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    input_ids: torch.Tensor      # [T] long: prompt_ids + response_ids (truncated to max_len)
    loss_mask: torch.Tensor      # [T] bool: True on response tokens
    id: str = ""
    prompt_id: str = ""          # the prompt it answers (several samples share one; the split goes by it)
    prompt_key: str = ""         # hash of the normalised prompt text (shards.prompt_key)

    def __len__(self) -> int:
        return self.input_ids.numel()


def iter_records(path: str | Path):
    """Records of a regeneration JSONL file, a shard file (`.npz`) or a directory of shards."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path} (create it with `ascend-dspark regen`)")
    if path.is_dir() or path.suffix == ".npz":
        return iter_shard_records(path)
    return iter(read_records(path))


def load_samples(paths: str | Path | Iterable[str | Path], max_len: int) -> list[Sample]:
    """Samples of regeneration files (JSONL, shard files or shard directories), in file order,
    each cut to `max_len` tokens.

    A record whose response falls entirely beyond `max_len` is dropped (nothing to learn);
    an id seen in an earlier file is dropped too (the same record packed twice). Several
    samples of one prompt have ids of their own (`<prompt id>#<k>`) and are all kept. Both
    drops are counted in one log line.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    samples: list[Sample] = []
    seen: set[str] = set()
    no_response = duplicates = 0
    for path in paths:
        for rec in iter_records(path):
            if rec["id"] in seen:
                duplicates += 1
                continue
            seen.add(rec["id"])
            prompt, response = rec["prompt_ids"], rec["response_ids"]
            ids = (prompt + response)[:max_len]
            if len(prompt) >= len(ids):
                no_response += 1
                continue
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[len(prompt):] = True
            key = rec.get("prompt_key") or (prompt_key(rec["prompt"]) if "prompt" in rec else "")
            samples.append(Sample(torch.tensor(ids, dtype=torch.long), mask, rec["id"], base_prompt_id(rec), key))
    if no_response or duplicates:
        logger.warning("load_samples: dropped %d records with no response token within max_len=%d and "
                       "%d repeated ids", no_response, max_len, duplicates)
    if not samples:
        raise ValueError(f"no training samples in {', '.join(map(str, paths))}")
    return samples


def collate(samples: list[Sample], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, T] long, loss_mask [B, T] bool, lengths [B] long), right-padded with
    id 0 / mask False to the longest row (rows first cut to `max_len` if given)."""
    rows = [(s.input_ids[:max_len], s.loss_mask[:max_len]) if max_len else (s.input_ids, s.loss_mask)
            for s in samples]
    lengths = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
    width = int(lengths.max())
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (ids, mask) in enumerate(rows):
        input_ids[b, : len(ids)] = ids
        loss_mask[b, : len(ids)] = mask
    return input_ids, loss_mask, lengths


class BatchSampler:
    """Sample indices, batch by batch, over endless seeded epochs (see the module docstring)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
        if num_samples < batch_size * world_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {batch_size} x {world_size} ranks")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch_size
        self.epoch = 0
        self.position = 0            # global batches already taken in this epoch
        self._order_epoch, self._order = -1, []

    def __len__(self) -> int:
        return self.batches_per_epoch

    def order(self, epoch: int) -> list[int]:
        """The permutation of epoch `epoch` (Python's `random`: stable across versions)."""
        if epoch != self._order_epoch:
            self._order = list(range(self.num_samples))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def global_batch(self, epoch: int, position: int) -> list[int]:
        start = position * self.global_batch_size
        return self.order(epoch)[start: start + self.global_batch_size]

    def next_batch(self) -> list[int]:
        """This rank's indices of the next global batch; moves the state on."""
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        rows = self.global_batch(self.epoch, self.position)
        self.position += 1
        return rows[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; the data and batching must be the same as then."""
        mine = self.state_dict()
        diff = [f"{k}: saved {state[k]}, now {mine[k]}" for k in ("seed", "num_samples", "batch_size", "world_size")
                if state.get(k) != mine[k]]
        if diff:
            raise ValueError("cannot resume the batch order: " + "; ".join(diff))
        if not 0 <= state["position"] <= self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"invalid sampler state: epoch {state['epoch']}, position {state['position']} "
                             f"of {self.batches_per_epoch} batches per epoch")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
