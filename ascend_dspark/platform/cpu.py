"""CPU platform: eager execution, float32 by default (bf16 matmuls are slow on most CPUs)."""

from __future__ import annotations

import os

import torch

from .interface import Platform


class CpuPlatform(Platform):
    name = "cpu"
    dist_backend = "gloo"
    op_backend = "reference"
    supports_graphs = False
    supports_bf16_autocast = False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def describe(self) -> str:
        return f"cpu ({os.cpu_count()} cores, torch {torch.__version__})"

    def memory_stats(self) -> dict[str, int]:
        try:
            import psutil

            vm = psutil.virtual_memory()
            return {"allocated_bytes": vm.total - vm.available, "reserved_bytes": 0,
                    "peak_allocated_bytes": 0, "total_bytes": vm.total}
        except ImportError:
            return super().memory_stats()
