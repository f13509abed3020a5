"""The collectives of a tensor-parallel group, with a plain single-process reference.

Two process groups over the same ranks:

    device    the platform's backend (gloo on the CPU, nccl on CUDA, hccl on Ascend:
              `Platform.dist_backend`): the model's activations, with a bounded timeout, so a
              rank that stops answering ends a step with an error instead of a hang;
    control   gloo, on the host: the driver's (rank 0's) commands to the other ranks, which
              wait on it between requests for as long as the server idles. A peer that dies
              closes its sockets, and gloo raises at once.

Row-parallel outputs are summed by an all-gather and an add in rank order (`sum_partials`),
not by `all_reduce`. Why: an all-reduce's summation order is the backend's choice (ring
chunks, trees, sizes), so the same partial sums can round differently from one backend or
message size to another, and a sampler that must pick the same token on every rank and on
every run wants one fixed order. With the gather every rank adds the same tensors in the
same order: bit-identical hidden states on every rank (the replicated drafter reads them),
by construction rather than by the backend's goodwill. It moves `size`x the bytes of a
reduce-scatter, which at decode sizes (a few rows of `hidden_size`) is latency, not bandwidth.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "ASCEND_DSPARK_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0          # one step's collectives; start-up (graph capture) included
CONTROL_TIMEOUT = datetime.timedelta(days=365)      # the followers wait for the next command


class TensorParallelError(RuntimeError):
    """A collective failed: a peer rank died, or stopped answering within the timeout."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def split_sizes(total: int, parts: int) -> list[int]:
    """`total` units over `parts` ranks, as evenly as possible, the larger shares first."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


class TensorParallelGroup:
    """Rank `rank` of `size`; every method is a collective all ranks call in the same order."""

    def __init__(self, rank: int, size: int, device: torch.device, device_group=None, control_group=None) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.device_group, self.control_group = device_group, control_group
        self.failure: str | None = None         # why the group can no longer compute (`fail`)

    def fail(self, why: str) -> None:
        """Mark the group broken (a watchdog saw a rank die): every later collective raises."""
        self.failure = self.failure or why

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def _run(self, what: str, fn):
        if self.failure is not None:
            raise TensorParallelError(f"tensor-parallel rank {self.rank}/{self.size}: {what} refused: {self.failure}")
        try:
            return fn()
        except (RuntimeError, pickle.UnpicklingError, EOFError, ConnectionError) as exc:
            if isinstance(exc, TensorParallelError):
                raise
            self.fail(f"{what} failed: another rank died or stopped answering within "
                      f"{TIMEOUT_ENV}={timeout_s():g}s ({type(exc).__name__}: {exc})")
            raise TensorParallelError(f"tensor-parallel rank {self.rank}/{self.size}: {self.failure}") from exc

    # -- the model's collectives ------------------------------------------------------------
    def sum_partials(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `x`, added in rank order (see the module docstring)."""
        parts = self.all_gather(x)
        total = parts[0]
        for r in range(1, self.size):
            total = total + parts[r]
        return total

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [..., n] side by side: [..., size * n] (rank order)."""
        parts = self.all_gather(x)                                  # [size, ..., n]
        return parts.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[size, *x.shape]: every rank's `x`."""
        x = x.contiguous().view(1, *x.shape)
        out = torch.empty((self.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self._run("all_gather", lambda: _all_gather_single(out, x, group=self.device_group))
        return out

    # -- the runner's -------------------------------------------------------------------------
    def broadcast_(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x`, in place."""
        self._run("broadcast", lambda: dist.broadcast(x, 0, group=self.device_group))
        return x

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        self._run("all_reduce(min)", lambda: dist.all_reduce(t, dist.ReduceOp.MIN, group=self.device_group))
        return int(t.item())

    def send_command(self, command: tuple) -> None:
        """Rank 0: hand the other ranks the next runner call (a picklable tuple)."""
        self._run("sending a command", lambda: dist.broadcast_object_list([command], 0, group=self.control_group))

    def receive_command(self) -> tuple:
        """The other ranks: wait for rank 0's next runner call."""
        box = [None]
        self._run("waiting for rank 0", lambda: dist.broadcast_object_list(box, 0, group=self.control_group))
        return box[0]

    def check_same(self, what: str, x: torch.Tensor) -> None:
        """Every rank holds the same `x` (the tokens a step committed), or the ranks other
        than 0 raise: ranks that sampled differently would go on with different caches.
        Only they read the result (a host wait on a follower, none on the driver)."""
        parts = self.all_gather(x)
        if not self.is_driver and not torch.equal(parts[self.rank], parts[0]):
            raise TensorParallelError(f"tensor-parallel rank {self.rank}: {what} differ from rank 0's "
                                      f"({parts[self.rank].tolist()} vs {parts[0].tolist()}): the ranks' logits "
                                      "were not identical")

    def barrier(self) -> None:
        self._run("barrier", lambda: dist.barrier(group=self.control_group))


# torch >= 2.10 names it all_gather_single (all_gather_into_tensor warns there); older torch
# (torch_npu pins one) has only all_gather_into_tensor. Both stack the ranks along dim 0.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def join(platform, size: int | None = None) -> TensorParallelGroup:
    """Join the process group torchrun (or `spawn`) described in the environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) over `platform`'s backend and device. `size`, if
    given, must equal WORLD_SIZE (one tensor-parallel group spans the whole job)."""
    if not launched_by_torchrun():
        raise RuntimeError("tensor parallelism needs the ranks' environment (RANK, WORLD_SIZE, MASTER_ADDR, "
                           "MASTER_PORT): launch with `torchrun --nproc-per-node N`, or `ascend-dspark serve "
                           "--tensor-parallel-size N`, which starts the ranks itself")
    world = int(os.environ["WORLD_SIZE"])
    if size is not None and size != world:
        raise ValueError(f"tensor_parallel_size={size} but torchrun started {world} processes "
                         f"(WORLD_SIZE): pass --nproc-per-node {size}")
    backend, device = platform.dist_backend, platform.device
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()),
                                **({"device_id": device} if platform.dist_bind_device else {}))
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    rank = dist.get_rank()
    logger.info("tensor parallel: rank %d of %d, %s over %s", rank, world, backend, device)
    return TensorParallelGroup(rank, world, device, dist.group.WORLD, control)

