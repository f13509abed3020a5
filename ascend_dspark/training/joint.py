"""Several drafters trained on the same batches, the target run once per step, and the loop
that drives one or more `Trainer`s (trainer.py) to the end of their schedules or of a time budget.

Why joint: DSpark and DFlash compared on different data or in a different order would not
be a like-for-like comparison, and the frozen target's forward is most of a step's cost, so
computing its features once (at the union of the members' layers) for all of them halves the
GPU time of training both.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .batch import TargetBatch
from .dataset import Sample
from .trainer import CONFIG_FILE, LOG_FILE, StepLog, Trainer

logger = logging.getLogger(__name__)

FIT_PROBE_STEPS = 20                   # steps timed before fit_steps sets the schedule's length


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
