"""`ascend-dspark train`: one config, one process or `torchrun --nproc-per-node N`.

    ascend-dspark train --config dspark_smollm2 --data regen.jsonl --out runs/dspark
    torchrun --nproc-per-node 8 -m ascend_dspark.cli train --config dspark_smollm2 ...

`--resume auto` (the default) continues from the newest checkpoint in --out, so a run cut
by a time limit is re-run with the same command. `--export DIR` writes the draft in this
project's format (what the engine loads) when the call ends, with train_progress.json.

Across GPU runs that keep nothing but the exported draft: `--init-from DRAFT_DIR` starts
from its weights and, when it carries train_progress.json, continues its schedule at the
step it reached (fresh optimiser, a short re-warmup; `--restart-schedule` starts a new one).

Several `--config`s train jointly on the same batches with one target forward per step:

    ascend-dspark train --config dspark_smollm2 --config dflash_smollm2 --data shards/ --out runs \
        --init-from dspark_smollm2=drafts/dspark --init-from dflash_smollm2=drafts/dflash --export export

(each drafter's run directory and export are --out/NAME and --export/NAME, NAME the config's
name). `--fit-steps` with `--time-budget-s` times the first steps and sets the schedule's
length so it ends inside the budget.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an eagle3 / dflash / dspark draft for a target")
    p.add_argument("--config", action="append", required=True,
                   help="a YAML file or a shipped config name (e.g. dspark_smollm2); repeat to train jointly")
    p.add_argument("--data", action="append", default=[],
                   help="regenerated JSONL, a shard file or a shard directory (repeatable; adds to the config's)")
    p.add_argument("--out", required=True, help="run directory: checkpoints step_N/, train_log.jsonl "
                                                "(with several configs: one subdirectory per config name)")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in --out) | none | a step_N dir")
    p.add_argument("--init-from", action="append", default=[], metavar="[NAME=]DIR",
                   help="start from this draft's weights (e.g. a shipped draft) instead of random init; with "
                        "several configs NAME=DIR per config; continues its train_progress.json schedule")
    p.add_argument("--restart-schedule", action="store_true",
                   help="with --init-from: start a new schedule at step 0 even if the draft has a progress file")
    p.add_argument("--time-budget-s", type=float, default=None, help="checkpoint and stop after this long")
    p.add_argument("--fit-steps", action="store_true",
                   help="with --time-budget-s: set the schedule's length from the first steps' speed so it ends "
                        "inside the budget")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="read the target's outputs from this offline cache, writing (or finishing) it first")
    p.add_argument("--export", default=None, help="also write the final draft here (this project's format)")
    p.add_argument("--device", default=None, help="cpu | cuda | npu (default: detect); torchrun adds the local rank")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ascend_dspark.models import load_target
    from ascend_dspark.platform import make_platform, set_platform

    from . import distributed
    from .config import load_config
    from .dataset import load_samples
    from .split import split_samples
    from .joint import JointTrainer
    from .trainer import Trainer, checkpoints

    names = [Path(c).stem if Path(c).is_file() else str(c) for c in args.config]
    if len(set(names)) != len(names):
        raise ValueError(f"--config given twice: {names}")
    cfgs = [load_config(c, args.set) for c in args.config]
    for cfg in cfgs:
        cfg.data = list(cfg.data) + list(args.data)
        if not cfg.data:
            raise ValueError("no training data: pass --data FILE.jsonl (from `ascend-dspark regen`) or set `data:`")
    joint = len(cfgs) > 1
    if joint:
        keys = {(tuple(c.data), c.max_len, c.target, c.val_fraction) for c in cfgs}
        if len(keys) != 1:
            raise ValueError("jointly trained configs must share data, max_len, target and val_fraction")
        if args.feature_cache:
            raise ValueError("--feature-cache holds one drafter's layers: train several configs online")
    inits = _init_from(args.init_from, names)
    spec = args.device
    if distributed.launched_by_torchrun():
        kind = (spec or make_platform(None).name).split(":")[0]
        spec = kind if kind == "cpu" else f"{kind}:{distributed.local_rank()}"
    platform = set_platform(make_platform(spec))
    distributed.init(platform.dist_backend)
    try:
        cfg = cfgs[0]
        dtype = torch.bfloat16 if platform.supports_bf16_autocast else torch.float32
        target, _ = load_target(cfg.target, dtype, platform.device)
        samples = load_samples(cfg.data, cfg.max_len)
        train, val = split_samples(samples, cfg.val_fraction, seed=0)
        _check_eval_disjoint(train + val)
        if distributed.rank() == 0:
            logger.warning("%d training samples, %d validation samples (%.1f%% of the prompts held out)",
                           len(train), len(val), 100 * cfg.val_fraction)
        cached = _feature_cache(args.feature_cache, target, train, cfg, platform) if args.feature_cache else None
        outs = [Path(args.out) / n if joint else Path(args.out) for n in names]
        members = [Trainer(c, target, train, out, platform, init_from=inits.get(n), progress=not args.no_progress,
                           cached_outputs=cached, val_samples=val, continue_schedule=not args.restart_schedule)
                   for c, n, out in zip(cfgs, names, outs)]
        for m, out in zip(members, outs):
            resume = _resume_path(args.resume, out)
            if resume is not None:
                m.resume(resume)
                if distributed.rank() == 0:
                    logger.warning("resumed from %s at step %d/%d", resume, m.step, m.cfg.steps)
            elif m.start_step and distributed.rank() == 0:
                logger.warning("continuing %s's schedule at step %d/%d from its weights (fresh optimiser)",
                               m.cfg.algorithm, m.step, m.cfg.steps)
        JointTrainer(members).train(args.time_budget_s, fit_steps=args.fit_steps)
        if distributed.rank() == 0:
            for m, n, out in zip(members, names, outs):
                if args.export:
                    dest = Path(args.export) / n if joint else Path(args.export)
                    m.export(dest)
                    print(f"exported {m.cfg.algorithm} draft (step {m.step}/{m.cfg.steps}) to {dest}")
                done = checkpoints(out)
                print(f"{m.cfg.algorithm}: step {m.step}/{m.cfg.steps}; newest checkpoint {done[-1] if done else None}")
    finally:
        distributed.shutdown()
    return 0


def _init_from(specs: list[str], names: list[str]) -> dict[str, str]:
    """--init-from values -> {config name: draft dir}; a bare DIR is allowed with one config."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(names) != 1:
                raise ValueError(f"--init-from {spec}: with several configs write NAME=DIR (names: {names})")
            name, path = names[0], spec
        if name not in names:
            raise ValueError(f"--init-from {spec}: {name!r} is none of the configs {names}")
        out[name] = path
    return out


def _check_eval_disjoint(samples) -> None:
    """Samples must not answer evaluation prompts; checked against every eval set this machine
    can read (GSM8K test always ships; HumanEval / MT-Bench need their packages)."""
    from .prompts import EVAL_SETS, load_prompts
    from .split import assert_disjoint_from_eval

    readable = []
    for name in EVAL_SETS:
        try:
            readable += load_prompts(name)
        except (FileNotFoundError, OSError, ValueError) as exc:
            logger.warning("eval set %s not readable here (%s): not checked against the training data", name, exc)
    assert_disjoint_from_eval(samples, readable)


def _feature_cache(path: str, target, samples, cfg, platform):
    """Rank 0 writes (or finishes) the cache for the config's target layers; all ranks read it."""
    from ascend_dspark.drafters.build import default_config

    from . import distributed
    from .batch import CachedTargetOutputs
    from .feature_cache import FeatureCache, write_feature_cache

    layer_ids = default_config(cfg.algorithm, target, **cfg.drafter).target_layer_ids
    if distributed.rank() == 0:
        write_feature_cache(target, samples, path, layer_ids)
    distributed.barrier()
    return CachedTargetOutputs(FeatureCache(path, target, layer_ids))


def _resume_path(spec: str, out: str) -> Path | None:
    from .trainer import checkpoints

    if spec == "none":
        return None
    if spec == "auto":
        found = checkpoints(out)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {spec}: not a checkpoint directory")
    return path
