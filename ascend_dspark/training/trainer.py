"""The training loop: one recipe for Eagle3, DFlash and DSpark drafts, one device or many.

Each step: the frozen target runs the batch once (features at the drafter's layers and its
final hidden states, online, no gradient; or they are read from an offline feature cache), the drafter's objective gives loss terms as
(numerator, denominator) pairs, denominators are summed over all data-parallel ranks, and
AdamW (fp32 master weights, bf16 autocast where the platform has it) steps under a linear
warmup + cosine schedule with gradient clipping.

Several drafters can train on the same batches (`joint.JointTrainer`): the target runs once per
step for all of them (its features at the union of their layers), so DSpark and DFlash see
the same data in the same order and their comparison is like for like.

Data parallelism is torch.distributed's DDP under `torchrun --nproc-per-node N`, with the
platform's collective backend (gloo on CPU, nccl on CUDA, hccl on Ascend). Each rank takes
its share of every global batch; dividing by the *global* denominator makes N ranks step
exactly like one process on the global batch. Rank 0 logs and writes checkpoints.

Resume is exact: a checkpoint holds the drafter, optimiser, schedule, the data sampler's
position and the host RNG states, and every random choice of a step (block anchors) comes
from generators seeded by (seed, step, row of the global batch), so an interrupted run continues bit for bit.

Training also adds up across GPU runs that share nothing but the draft's weights (the
optimiser state, twice the weights in fp32, is too big to carry): an export writes
`train_progress.json` beside the weights (the step reached, the schedule's total, the data
seen), and a trainer started `init_from` such a draft continues the warmup + cosine schedule
at that step, with a fresh optimiser whose learning rate ramps up again over
`rewarm_steps`, on whatever data that run regenerated.

Validation: a fixed ~2% of the prompts (`split.py`) is held out; when a call starts, every
`val_every` steps and at the end the teacher-forced acceptance of each block slot (1 - TV, the T=1 rate) and
the argmax agreement with the target (the T=0 rate) are measured on it and logged as
`{"step", "val": {...}}` lines in train_log.jsonl.
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

from ascend_dspark.drafters import create_drafter, load_drafter, save_drafter
from ascend_dspark.platform import Platform

from . import distributed
from .batch import CachedTargetOutputs, TargetBatch, target_outputs
from .block_objective import block_objective, block_validation_sums, validation_metrics
from .config import TrainConfig
from .dataset import BatchSampler, Sample, collate
from .eagle3_objective import eagle3_loss_weights, eagle3_objective

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"
PROGRESS_FILE = "train_progress.json"
VAL_SEED = 0x5EED_0F_7A1               # anchors of the validation batches: fixed, unlike training's


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
                 cached_outputs: CachedTargetOutputs | None = None, val_samples: list[Sample] | None = None,
                 continue_schedule: bool = True) -> None:
        """`init_from`: start from a draft's weights; if it carries train_progress.json and
        `continue_schedule`, the schedule continues at its step (see the module docstring).
        `val_samples`: held-out samples for the validation metrics (none: no validation)."""
        self.cfg = cfg
        self.platform = platform
        self.device = platform.device
        self.target = target.requires_grad_(False).eval()
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.step = 0
        self.start_step = 0            # where this run's weights-only start sits in the schedule
        self.init_progress: dict | None = None
        if init_from is not None:
            drafter = load_drafter(init_from, target, dtype=torch.float32)
            self.init_progress = read_progress(init_from)
            if self.init_progress is not None and continue_schedule:
                self._continue_schedule(self.init_progress, init_from)
        else:
            drafter = create_drafter(cfg.algorithm, target, seed=cfg.seed, dtype=torch.float32, **cfg.drafter)
        self.drafter = drafter.to(self.device).train()
        self.objective = Objective(self.drafter, cfg)
        self.module = distributed.wrap(self.objective, self.device)
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr_at(self.step), betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.samples = samples
        self.val_samples = list(val_samples or [])
        self.cached_outputs = cached_outputs
        self.sampler = BatchSampler(len(samples), cfg.batch_size, cfg.seed, self.rank, self.world_size)
        self.samples_seen = 0          # sequences this run trained on (all ranks)
        self.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" and platform.supports_bf16_autocast else None
        if cfg.precision == "bf16" and self.autocast_dtype is None and self.rank == 0:
            logger.warning("precision bf16: %s has no bf16 autocast; training in float32", platform.describe())

    def _continue_schedule(self, progress: dict, source) -> None:
        cfg = self.cfg
        if progress.get("algorithm") not in (None, cfg.algorithm):
            raise ValueError(f"{source}: a {progress['algorithm']} draft, config says {cfg.algorithm}")
        step = int(progress["step"])
        if progress.get("steps") not in (None, cfg.steps) and self.rank == 0:
            logger.warning("%s was trained under a %s-step schedule; continuing it at step %d of the config's %d",
                           source, progress["steps"], step, cfg.steps)
        if step >= cfg.steps:
            raise ValueError(f"{source} is at step {step}, the end of a {cfg.steps}-step schedule: "
                             "raise `steps` to train it further (or pass --restart-schedule)")
        self.step = self.start_step = step

    # -- the schedule -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): cfg.lr x warmup/cosine x the re-warmup
        of a weights-only continuation (linear over rewarm_steps from start_step)."""
        factor = lr_factor(step, self.cfg)
        if self.start_step > 0 and self.cfg.rewarm_steps > 0:
            factor *= min(1.0, (step - self.start_step + 1) / self.cfg.rewarm_steps)
        return self.cfg.lr * factor

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
            "start_step": self.start_step,
            "samples_seen": self.samples_seen,
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "config": self.cfg.to_dict(),
            "world_size": self.world_size,
        }, tmp / STATE_FILE)
        write_progress(tmp, self.progress_record())
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
        self.drafter.load_state_dict(loaded.state_dict())      # in place: the optimiser keeps its parameters
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        self.step = state["step"]
        self.start_step = state.get("start_step", 0)
        self.samples_seen = state.get("samples_seen", 0)

    def progress_record(self) -> dict:
        """What train_progress.json says about these weights."""
        before = (self.init_progress or {}).get("samples_seen_total", 0) if self.start_step else 0
        return {"algorithm": self.cfg.algorithm, "step": self.step, "steps": self.cfg.steps,
                "finished": self.step >= self.cfg.steps, "samples_seen_total": before + self.samples_seen,
                "train_samples_this_run": len(self.samples), "lr": self.cfg.lr, "betas": list(self.cfg.betas),
                "config": self.cfg.to_dict()}

    def export(self, path: str | Path, dtype: torch.dtype = torch.bfloat16,
               max_shard_bytes: int | None = None) -> Path:
        """The draft in this project's format (cast to `dtype`) plus train_progress.json, so a
        later run can continue from it (`init_from`). Over `max_shard_bytes` (default 15 MiB)
        the weights are written as HF-convention shards."""
        from .export import save_drafter_sharded

        out = save_drafter_sharded(self.drafter, path, dtype, max_shard_bytes)
        write_progress(out, self.progress_record())
        return out

    # -- the loop ---------------------------------------------------------------------------
    def make_batch(self, rows: list[Sample], layer_ids=None) -> TargetBatch:
        """The batch of `rows` with the target's outputs at `layer_ids` (default: the drafter's)."""
        layer_ids = tuple(self.drafter.target_layer_ids if layer_ids is None else layer_ids)
        ids, mask, lengths = collate(rows)
        ids, mask, lengths = ids.to(self.device), mask.to(self.device), lengths.to(self.device)
        if self.cached_outputs is not None:
            if layer_ids != tuple(self.drafter.target_layer_ids):
                raise ValueError("an offline feature cache holds one drafter's layers: train jointly online")
            features, last_hidden = self.cached_outputs.batch(rows, lengths, self.device)
        else:
            features, last_hidden = target_outputs(self.target, ids, lengths, layer_ids)
        return TargetBatch(ids, mask, lengths, features, last_hidden)

    def batch(self) -> TargetBatch:
        return self.make_batch([self.samples[i] for i in self.sampler.next_batch()])

    def train_step(self) -> StepLog:
        t0 = time.perf_counter()
        return self.step_on(self.batch(), t0)

    def step_on(self, batch: TargetBatch, t0: float | None = None) -> StepLog:
        """One optimiser step on a batch whose features are this drafter's layers."""
        t0 = time.perf_counter() if t0 is None else t0
        first_row = self.rank * self.cfg.batch_size
        row_seeds = [hash_seed(self.cfg.seed, self.step, first_row + i) for i in range(batch.input_ids.shape[0])]
        with self._autocast():
            terms, metrics = self.module(batch, row_seeds)
        weights = self.objective.loss_weights()
        dens = distributed.all_reduce_sum(torch.stack([terms[k].denominator.float() for k in weights]))
        loss = sum(w * terms[k].numerator / dens[i].clamp(min=1e-12) for i, (k, w) in enumerate(weights.items()))
        (loss * self.world_size).backward()          # DDP averages gradients over ranks
        torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.cfg.grad_clip)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += self.cfg.batch_size * self.world_size
        tokens = int(batch.lengths.sum())
        return StepLog(self.step, float(distributed.all_reduce_mean(loss.detach())), lr,
                       {k: float(terms[k].mean(dens[i]).detach()) for i, k in enumerate(weights)},
                       {k: float(v) for k, v in metrics.items()}, tokens / (time.perf_counter() - t0))

    # -- validation -------------------------------------------------------------------------
    def val_batches(self) -> list[list[Sample]]:
        bs = self.cfg.batch_size
        rows = self.val_samples[: bs * self.cfg.val_batches]
        return [rows[i: i + bs] for i in range(0, len(rows), bs)]

    @torch.no_grad()
    def val_sums(self, batch: TargetBatch, first_row: int) -> dict[str, torch.Tensor]:
        """This drafter's validation sums on one held-out batch (see block_validation_sums)."""
        row_seeds = [hash_seed(self.cfg.seed, VAL_SEED, first_row + i) for i in range(batch.input_ids.shape[0])]
        was_training = self.drafter.training
        self.drafter.eval()
        try:
            with self._autocast():
                if self.cfg.algorithm == "eagle3":
                    _, metrics = eagle3_objective(self.drafter, batch, self.drafter.config.ttt_length)
                    return {k: torch.tensor([float(v)], dtype=torch.float64) for k, v in metrics.items()} | {
                        "batches": torch.ones(1, dtype=torch.float64)}
                return block_validation_sums(self.drafter, batch, self.cfg.num_anchors, row_seeds)
        finally:
            self.drafter.train(was_training)

    def val_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.cfg.algorithm == "eagle3":
            n = float(sums.pop("batches"))
            return {k: float(v) / n for k, v in sums.items()}
        return validation_metrics(sums)

    def validate(self) -> dict[str, float] | None:
        """The validation metrics of the current weights (None without validation samples)."""
        from .joint import JointTrainer

        return JointTrainer([self]).validate()[0]

    def train(self, time_budget_s: float | None = None, fit_steps: bool = False) -> Path | None:
        """Run to cfg.steps (or until the time budget), checkpointing every cfg.checkpoint_every
        steps and at the end. `fit_steps` (with a budget): after joint.FIT_PROBE_STEPS timed steps,
        set cfg.steps so the schedule ends inside the budget. Returns the last checkpoint
        written (rank 0)."""
        from .joint import JointTrainer

        return JointTrainer([self]).train(time_budget_s, fit_steps)[0]

    @contextlib.contextmanager
    def _autocast(self):
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                yield


def read_progress(path: str | Path) -> dict | None:
    """The train_progress.json of a draft directory, or None if it has none."""
    file = Path(path) / PROGRESS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def write_progress(path: str | Path, record: dict) -> None:
    (Path(path) / PROGRESS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


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
