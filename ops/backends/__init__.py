"""Device backends for ops/: `triton` (CUDA) and `npu` (Ascend, torch_npu). Each module
registers implementations with `ops.registry.register(op, backend)` when imported."""
