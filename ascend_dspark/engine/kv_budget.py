"""How many KV-cache blocks the model runner allocates: enough for every slot to reach
max_model_len, or, on a device that reports its memory, as many as fit in a fraction of it
beside what the weights (and anything else) already hold, whichever is fewer. Under tensor
parallelism every rank's block tables must be the same, so all ranks take the smallest fit.
"""

from __future__ import annotations

import logging

from ascend_dspark.cache import PagedKVCache

logger = logging.getLogger(__name__)


def kv_heads_here(target) -> int:
    """The KV heads this rank's cache holds: its shard's under tensor parallelism (models/parallel.py)."""
    return getattr(target, "num_local_kv_heads", target.config.num_kv_heads)


def fitting_kv_blocks(runner, wanted: int, block_size: int, fraction: float) -> int:
    """`wanted` blocks, or as many as fit in `fraction` of the runner's device memory (for the
    target's and the drafter's caches together)."""
    platform = runner.platform
    if not platform.kv_cache_from_memory:
        return wanted
    stats = platform.memory_stats()
    cfg = runner.target.config
    per_block = PagedKVCache.bytes_per_block(cfg.num_layers, block_size, kv_heads_here(runner.target),
                                             cfg.head_dim, runner.dtype)
    if runner.drafter is not None:
        per_block += runner.drafter.kv_bytes_per_block(block_size, runner.dtype)
    room = int(fraction * stats["total_bytes"]) - stats["reserved_bytes"]
    fits = max(room // per_block, 0)
    if runner.tp is not None:         # every rank's tables must be the same: the smallest fit
        fits = runner.tp.min_int(fits)
    if fits < wanted:
        logger.info("KV cache: %d blocks of %d positions fit in %.0f%% of %s memory (%d would let every slot "
                    "reach max_model_len): requests wait for blocks when they run out",
                    fits, block_size, 100 * fraction, platform.name, wanted)
    if fits < 1:
        raise MemoryError(f"no room for a KV cache in {fraction:.0%} of the device's memory "
                          f"({stats['reserved_bytes'] / 2**30:.1f} GiB already reserved)")
    return min(wanted, fits)
