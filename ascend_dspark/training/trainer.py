"""The training loop: one recipe for Eagle3, DFlash and DSpark drafts, one device or many.

Each step: the frozen target runs the batch once (features at the drafter's layers and its
final hidden states, online, no gradient; or they are read from an offline feature cache), the drafter's objective gives loss terms as
(numerator, denominator) pairs, denominators are summed over all data-parallel ranks, and
AdamW (fp32 master weights, bf16 autocast where the platform has it) steps under a linear
warmup + cosine schedule with gradient clipping.

Several drafters can train on the same batches (`JointTrainer`): the target runs once per
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
from tqdm.auto import tqdm

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
FIT_PROBE_STEPS = 20                   # steps timed before fit_steps sets the schedule's length


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
        return JointTrainer([self]).validate()[0]

    def train(self, time_budget_s: float | None = None, fit_steps: bool = False) -> Path | None:
        """Run to cfg.steps (or until the time budget), checkpointing every cfg.checkpoint_every
        steps and at the end. `fit_steps` (with a budget): after FIT_PROBE_STEPS timed steps,
        set cfg.steps so the schedule ends inside the budget. Returns the last checkpoint
        written (rank 0)."""
        return JointTrainer([self]).train(time_budget_s, fit_steps)[0]

    @contextlib.contextmanager
    def _autocast(self):
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                yield


class JointTrainer:
    """Several drafters trained on the same batches, the target run once per step.

    Members are `Trainer`s over the same samples, batch size, seed and ranks, so their
    samplers draw the same batches; the target's features are computed at the union of
    their layers and each member reads its own. Each member keeps its own optimiser,
    schedule, checkpoints (in its own out_dir) and log."""

    def __init__(self, members: list[Trainer]) -> None:
        if not members:
            raise ValueError("JointTrainer needs at least one Trainer")
        first = members[0]
        for m in members[1:]:
            diff = [name for name, a, b in (("samples", m.samples, first.samples),
                                            ("val_samples", [s.id for s in m.val_samples],
                                             [s.id for s in first.val_samples]),
                                            ("batch_size", m.cfg.batch_size, first.cfg.batch_size),
                                            ("seed", m.cfg.seed, first.cfg.seed),
                                            ("world_size", m.world_size, first.world_size)) if a is not b and a != b]
            if diff:
                raise ValueError(f"drafters trained jointly must share {', '.join(diff)}")
            if m.cached_outputs is not None:
                raise ValueError("joint training runs the target online (an offline cache holds one drafter's layers)")
            if m.out_dir == first.out_dir:
                raise ValueError(f"two jointly trained drafters write to one directory {m.out_dir}")
        self.members = members
        self.layer_ids = tuple(sorted({j for m in members for j in m.drafter.target_layer_ids}))

    def _view(self, batch: TargetBatch, member: Trainer) -> TargetBatch:
        mine = tuple(member.drafter.target_layer_ids)
        if mine == self.layer_ids:
            return batch
        h = batch.features.shape[-1] // len(self.layer_ids)
        parts = [batch.features[..., self.layer_ids.index(j) * h: (self.layer_ids.index(j) + 1) * h] for j in mine]
        return TargetBatch(batch.input_ids, batch.loss_mask, batch.lengths, torch.cat(parts, -1), batch.last_hidden)

    def _shared_batch(self, rows: list[Sample]) -> TargetBatch:
        first = self.members[0]
        layers = None if len(self.members) == 1 else self.layer_ids
        return first.make_batch(rows, layers)

    def train_step(self) -> list[StepLog | None]:
        """One step of every member still inside its schedule (None for those past it)."""
        t0 = time.perf_counter()
        active = [m for m in self.members if m.step < m.cfg.steps]
        indices = [m.sampler.next_batch() for m in active]
        if any(ix != indices[0] for ix in indices[1:]):
            raise RuntimeError("jointly trained drafters drew different batches: their samplers were resumed "
                               "from different positions; resume them from checkpoints of the same step")
        batch = self._shared_batch([active[0].samples[i] for i in indices[0]])
        logs = {id(m): m.step_on(self._view(batch, m), t0) for m in active}
        return [logs.get(id(m)) for m in self.members]

    def validate(self) -> list[dict[str, float] | None]:
        """Every member's validation metrics on the same held-out batches."""
        first = self.members[0]
        batches = first.val_batches()
        if not batches:
            return [None] * len(self.members)
        totals: list[dict[str, torch.Tensor]] = [{} for _ in self.members]
        for b, rows in enumerate(batches):
            batch = self._shared_batch(rows)
            for total, m in zip(totals, self.members):
                for k, v in m.val_sums(self._view(batch, m), b * first.cfg.batch_size).items():
                    total[k] = total[k] + v if k in total else v
        return [m.val_metrics(t) for m, t in zip(self.members, totals)]

    def _fit_steps(self, budget_s: float, elapsed_s: float, probe_steps: int) -> None:
        """Set every member's schedule to end inside the budget, from the probe's step rate."""
        per_step = distributed.all_reduce_mean(torch.tensor(elapsed_s / probe_steps, dtype=torch.float64))
        remaining = fitted_steps(budget_s, elapsed_s, float(per_step))
        for m in self.members:
            old = m.cfg.steps
            m.cfg.steps = m.step + remaining
            if m.rank == 0:
                logger.warning("%s: %.3f s/step over %d steps: schedule set to end at step %d (was %d)",
                               m.cfg.algorithm, float(per_step), probe_steps, m.cfg.steps, old)

    def train(self, time_budget_s: float | None = None, fit_steps: bool = False) -> list[Path | None]:
        """Train every member to its cfg.steps (or until the budget); see Trainer.train."""
        start = time.perf_counter()
        members = self.members
        lead = members[0]
        logs = {}
        for m in members:
            m.out_dir.mkdir(parents=True, exist_ok=True)
            if m.rank == 0:
                (m.out_dir / CONFIG_FILE).write_text(json.dumps(m.cfg.to_dict(), indent=2) + "\n")
                logs[id(m)] = (m.out_dir / LOG_FILE).open("a")
        name = "+".join(m.cfg.algorithm for m in members)
        bar = tqdm(total=max(m.cfg.steps for m in members), initial=min(m.step for m in members),
                   desc=f"train {name}", disable=not lead.progress or lead.rank != 0, unit="step")
        last: list[Path | None] = [None] * len(members)
        taken = 0
        val_at = -1
        try:
            if lead.val_samples and any(m.step < m.cfg.steps for m in members):
                self._log_validation(logs)           # where this call starts: the baseline of its gains
                val_at = lead.step
            while any(m.step < m.cfg.steps for m in members):
                entries = self.train_step()
                taken += 1
                bar.update(1)
                if fit_steps and time_budget_s is not None and taken == FIT_PROBE_STEPS:
                    self._fit_steps(time_budget_s, time.perf_counter() - start, taken)
                    bar.total = max(m.cfg.steps for m in members)
                for m, e in zip(members, entries):
                    if e is not None and m.rank == 0 and (e.step % m.cfg.log_every == 0 or e.step == m.cfg.steps):
                        logs[id(m)].write(json.dumps(e.__dict__) + "\n")
                        logs[id(m)].flush()
                if lead.rank == 0 and entries[0] is not None and entries[0].step % lead.cfg.log_every == 0:
                    bar.set_postfix(loss=f"{entries[0].loss:.3f}", tau=f"{entries[0].metrics['tau_prob']:.2f}",
                                    lr=f"{entries[0].lr:.1e}")
                out_of_time = time_budget_s is not None and time.perf_counter() - start > time_budget_s
                done = all(m.step >= m.cfg.steps for m in members)
                if lead.val_samples and (lead.step % lead.cfg.val_every == 0 or done or out_of_time):
                    self._log_validation(logs)
                    val_at = lead.step
                for i, (m, e) in enumerate(zip(members, entries)):
                    if e is not None and (m.step % m.cfg.checkpoint_every == 0 or m.step == m.cfg.steps
                                          or out_of_time):
                        last[i] = m.save_checkpoint() or last[i]
                if out_of_time:
                    if lead.rank == 0:
                        logger.warning("time budget of %.0f s reached at step %d/%d: checkpointed; resume to continue",
                                       time_budget_s, lead.step, lead.cfg.steps)
                    break
            if lead.val_samples and val_at != lead.step and taken:
                self._log_validation(logs)
        finally:
            bar.close()
            for f in logs.values():
                f.close()
        return last

    def _log_validation(self, logs: dict) -> None:
        if self.members[0].rank != 0:
            return
        for m, metrics in zip(self.members, self.validate()):
            if metrics is not None:
                logs[id(m)].write(json.dumps({"step": m.step, "val": metrics}) + "\n")
                logs[id(m)].flush()
                logger.warning("%s step %d validation: accept@1 %.3f, argmax@1 %s, tau_prob %.3f",
                               m.cfg.algorithm, m.step, metrics.get("accept@1", float("nan")),
                               f"{metrics['argmax@1']:.3f}" if "argmax@1" in metrics else "-",
                               metrics.get("tau_prob", float("nan")))


def fitted_steps(budget_s: float, elapsed_s: float, seconds_per_step: float, margin: float = 0.95) -> int:
    """Steps that still fit the budget at this rate, keeping (1 - margin) of what is left in
    reserve (the last validation and checkpoint); at least 1."""
    left = (budget_s - elapsed_s) * margin
    return max(1, int(left / seconds_per_step)) if seconds_per_step > 0 else 1


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
