"""`ascend-dspark train`: one config, one process or `torchrun --nproc-per-node N`.

    ascend-dspark train --config dspark_smollm2 --data regen.jsonl --out runs/dspark
    torchrun --nproc-per-node 8 -m ascend_dspark.cli train --config dspark_smollm2 ...

`--resume auto` (the default) continues from the newest checkpoint in --out, so a run cut
by a time limit is re-run with the same command. `--export DIR` writes the final draft in
this project's format (what the engine loads) when training ends.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an eagle3 / dflash / dspark draft for a target")
    p.add_argument("--config", required=True, help="a YAML file or a shipped config name (e.g. dspark_smollm2)")
    p.add_argument("--data", action="append", default=[], help="regenerated JSONL (repeatable; adds to the config's)")
    p.add_argument("--out", required=True, help="run directory: checkpoints step_N/, train_log.jsonl")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in --out) | none | a step_N dir")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from this draft's weights (e.g. a shipped draft) instead of random init")
    p.add_argument("--time-budget-s", type=float, default=None, help="checkpoint and stop after this long")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="read the target's outputs from this offline cache, writing (or finishing) it first")
    p.add_argument("--export", default=None, help="also write the final draft here (this project's format)")
    p.add_argument("--device", default=None, help="cpu | cuda | npu (default: detect); torchrun adds the local rank")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ascend_dspark.drafters import save_drafter
    from ascend_dspark.models import load_target
    from ascend_dspark.platform import make_platform, set_platform

    from . import distributed
    from .config import load_config
    from .dataset import load_samples
    from .trainer import Trainer, checkpoints

    cfg = load_config(args.config, args.set)
    cfg.data = list(cfg.data) + list(args.data)
    if not cfg.data:
        raise ValueError("no training data: pass --data FILE.jsonl (from `ascend-dspark regen`) or set `data:`")
    spec = args.device
    if distributed.launched_by_torchrun():
        kind = (spec or make_platform(None).name).split(":")[0]
        spec = kind if kind == "cpu" else f"{kind}:{distributed.local_rank()}"
    platform = set_platform(make_platform(spec))
    distributed.init(platform.dist_backend)
    try:
        dtype = torch.bfloat16 if platform.supports_bf16_autocast else torch.float32
        target, _ = load_target(cfg.target, dtype, platform.device)
        samples = load_samples(cfg.data, cfg.max_len)
        cached = _feature_cache(args.feature_cache, target, samples, cfg, platform) if args.feature_cache else None
        trainer = Trainer(cfg, target, samples, args.out, platform, init_from=args.init_from,
                          progress=not args.no_progress, cached_outputs=cached)
        resume = _resume_path(args.resume, args.out)
        if resume is not None:
            trainer.resume(resume)
            if distributed.rank() == 0:
                logger.warning("resumed from %s at step %d/%d", resume, trainer.step, cfg.steps)
        trainer.train(args.time_budget_s)
        if args.export and distributed.rank() == 0 and trainer.step >= cfg.steps:
            save_drafter(trainer.drafter.to(torch.bfloat16), args.export)
            print(f"exported {cfg.algorithm} draft to {args.export}")
        if distributed.rank() == 0:
            done = checkpoints(args.out)
            print(f"{cfg.algorithm}: step {trainer.step}/{cfg.steps}; newest checkpoint {done[-1] if done else None}")
    finally:
        distributed.shutdown()
    return 0


def _feature_cache(path: str, target, samples, cfg, platform):
    """Rank 0 writes (or finishes) the cache for the config's target layers; all ranks read it."""
    from ascend_dspark.drafters.checkpoint import default_config

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
