"""The training loop: one recipe for Eagle3, DFlash and DSpark drafts, one device or many.

Each step: the frozen target runs the batch once (features at the drafter's layers and its
final hidden states, online, no gradient; or they are read from an offline feature cache), the drafter's objective gives loss terms as
(numerator, denominator) pairs, denominators are summed over all data-parallel ranks, and
AdamW (fp32 master weights, bf16 autocast where the platform has it) steps under a linear
warmup + cosine schedule with gradient clipping.

Data parallelism is torch.distributed's DDP under `torchrun --nproc-per-node N`, with the
platform's collective backend (gloo on CPU, nccl on CUDA, hccl on Ascend). Each rank takes
its share of every global batch; dividing by the *global* denominator makes N ranks step
exactly like one process on the global batch. Rank 0 logs and writes checkpoints.

Resume is exact: a checkpoint holds the drafter, optimiser, schedule, the data sampler's
position and the host RNG states, and every random choice of a step (block anchors) comes
from generators seeded by (seed, step, row of the global batch), so an interrupted run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ascend_dspark.drafters import create_drafter, load_drafter, save_drafter
from ascend_dspark.platform import Platform

from . import distributed
from .batch import CachedTargetOutputs, TargetBatch, target_outputs
from .block_objective import block_objective
from .config import TrainConfig
from .dataset import BatchSampler, Sample, collate
from .eagle3_objective import eagle3_loss_weights, eagle3_objective

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"


class Objective(nn.Module):
    """The drafter plus its loss: the module DDP wraps (its forward is one step's loss terms)."""

    def __init__(self, drafter: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.drafter = drafter
        self.cfg = cfg

    def forward(self, batch: TargetBatch, row_seeds: list[int]):
        cfg = self.cfg
        if cfg.algorithm == "eagle3":
            terms, metrics = eagle3_objective(self.drafter, batch, self.drafter.config.ttt_length)
        else:
            terms, metrics = block_objective(self.drafter, batch, cfg.num_anchors, cfg.position_decay,
                                             row_seeds, cfg.loss_weights)
        return terms, metrics

    def loss_weights(self) -> dict[str, float]:
        if self.cfg.algorithm == "eagle3":
            return eagle3_loss_weights(self.drafter.config.ttt_length, self.cfg.ttt_step_decay)
        return {k: v for k, v in self.cfg.loss_weights.items() if v}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup_steps, then cosine from 1 down to cfg.min_lr_ratio."""
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    terms: dict[str, float]
    metrics: dict[str, float]
    tokens_per_s: float


class Trainer:
    def __init__(self, cfg: TrainConfig, target: nn.Module, samples: list[Sample], out_dir: str | Path,
                 platform: Platform, init_from: str | Path | None = None, progress: bool = True,
                 cached_outputs: CachedTargetOutputs | None = None) -> None:
        self.cfg = cfg
        self.platform = platform
        self.device = platform.device
        self.target = target.requires_grad_(False).eval()
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if init_from is not None:
            drafter = load_drafter(init_from, target, dtype=torch.float32)
        else:
            drafter = create_drafter(cfg.algorithm, target, seed=cfg.seed, dtype=torch.float32, **cfg.drafter)
        self.drafter = drafter.to(self.device).train()
        self.objective = Objective(self.drafter, cfg)
        self.module = distributed.wrap(self.objective, self.device)
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.samples = samples
        self.cached_outputs = cached_outputs
        self.sampler = BatchSampler(len(samples), cfg.batch_size, cfg.seed, self.rank, self.world_size)
        self.step = 0
        self.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" and platform.supports_bf16_autocast else None
        if cfg.precision == "bf16" and self.autocast_dtype is None and self.rank == 0:
            logger.warning("precision bf16: %s has no bf16 autocast; training in float32", platform.describe())

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes `step_{N}/` (a loadable drafter + the trainer state); keeps the newest few."""
        if self.rank != 0:
            return None
        path = self.out_dir / f"step_{self.step:07d}"
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_drafter(self.drafter, tmp)
        torch.save({
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "config": self.cfg.to_dict(),
            "world_size": self.world_size,
        }, tmp / STATE_FILE)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in checkpoints(self.out_dir)[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def resume(self, path: str | Path) -> None:
        """Continue from a `step_N` directory (model, optimiser, schedule, data position, RNG)."""
        path = Path(path)
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        if state["world_size"] != self.world_size:
            raise ValueError(f"{path}: written by {state['world_size']} rank(s), resuming with {self.world_size}: "
                             "the data order would differ; resume with the same number of ranks")
        if state["config"]["algorithm"] != self.cfg.algorithm:
            raise ValueError(f"{path}: a {state['config']['algorithm']} checkpoint, config says {self.cfg.algorithm}")
        loaded = load_drafter(path, self.target, dtype=torch.float32)
        with torch.no_grad():
            for mine, theirs in zip(self.drafter.state_dict().values(), loaded.state_dict().values()):
                mine.copy_(theirs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        self.step = state["step"]

    # -- the loop ---------------------------------------------------------------------------
    def batch(self) -> TargetBatch:
        rows = [self.samples[i] for i in self.sampler.next_batch()]
        ids, mask, lengths = collate(rows)
        ids, mask, lengths = ids.to(self.device), mask.to(self.device), lengths.to(self.device)
        if self.cached_outputs is not None:
            features, last_hidden = self.cached_outputs.batch(rows, lengths, self.device)
        else:
            features, last_hidden = target_outputs(self.target, ids, lengths, self.drafter.target_layer_ids)
        return TargetBatch(ids, mask, lengths, features, last_hidden)

    def train_step(self) -> StepLog:
        t0 = time.perf_counter()
        batch = self.batch()
        first_row = self.rank * self.cfg.batch_size
        row_seeds = [hash_seed(self.cfg.seed, self.step, first_row + i) for i in range(batch.input_ids.shape[0])]
        with self._autocast():
            terms, metrics = self.module(batch, row_seeds)
        weights = self.objective.loss_weights()
        dens = distributed.all_reduce_sum(torch.stack([terms[k].denominator.float() for k in weights]))
        loss = sum(w * terms[k].numerator / dens[i].clamp(min=1e-12) for i, (k, w) in enumerate(weights.items()))
        (loss * self.world_size).backward()          # DDP averages gradients over ranks
        torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        tokens = int(batch.lengths.sum())
        return StepLog(self.step, float(distributed.all_reduce_mean(loss.detach())), lr,
                       {k: float(terms[k].mean(dens[i]).detach()) for i, k in enumerate(weights)},
                       {k: float(v) for k, v in metrics.items()}, tokens / (time.perf_counter() - t0))

    def train(self, time_budget_s: float | None = None) -> Path | None:
        """Run to cfg.steps (or until the time budget), checkpointing every cfg.checkpoint_every
        steps and at the end. Returns the last checkpoint written (rank 0)."""
        start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out_dir / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train {self.cfg.algorithm}",
                   disable=not self.progress or self.rank != 0, unit="step")
        last = None
        log = (self.out_dir / LOG_FILE).open("a") if self.rank == 0 else None
        try:
            while self.step < self.cfg.steps:
                entry = self.train_step()
                bar.update(1)
                if self.rank == 0 and (entry.step % self.cfg.log_every == 0 or entry.step == self.cfg.steps):
                    bar.set_postfix(loss=f"{entry.loss:.3f}", tau=f"{entry.metrics['tau_prob']:.2f}",
                                    lr=f"{entry.lr:.1e}")
                    log.write(json.dumps(entry.__dict__) + "\n")
                    log.flush()
                out_of_time = time_budget_s is not None and time.perf_counter() - start > time_budget_s
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps or out_of_time:
                    last = self.save_checkpoint() or last
                if out_of_time:
                    if self.rank == 0:
                        logger.warning("time budget of %.0f s reached at step %d/%d: checkpointed; resume to continue",
                                       time_budget_s, self.step, self.cfg.steps)
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
        return last

    @contextlib.contextmanager
    def _autocast(self):
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                yield


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    out = Path(out_dir)
    return sorted(p for p in out.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / STATE_FILE).is_file())


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x >> 1
