"""Start the other ranks of a tensor-parallel group from rank 0 (`ascend-dspark serve
--tensor-parallel-size N` without torchrun), and watch them.

Rank 0 (this process) picks a free loopback port, sets the environment torchrun would set
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for itself and for N - 1 child
processes (multiprocessing's spawn start method: a fresh interpreter, no forked threads or
device state) that each run `target(*args)`. The children are daemonic: they end with rank 0.

`Watchdog` polls the children once a second: when one has died it records why on the group
(`TensorParallelGroup.fail`), which the engine reports as its failure (the server's /health
turns 503 at once, even while idle) and the next step raises. A child whose rank 0 died
notices on its own: the control group's sockets close (group.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading

logger = logging.getLogger(__name__)


def spawn_ranks(size: int, target, args: tuple) -> list:
    """Make this process rank 0 of `size` and start ranks 1..size-1 running `target(*args)`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {"WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update(common, RANK="0", LOCAL_RANK="0")
    ctx = multiprocessing.get_context("spawn")
    children = []
    for rank in range(1, size):
        env = {**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        p = ctx.Process(target=_run_rank, args=(env, target, args), name=f"tp-rank-{rank}", daemon=True)
        p.start()
        children.append(p)
    logger.info("tensor parallel: started ranks 1..%d (pids %s) on port %d", size - 1,
                ", ".join(str(p.pid) for p in children), port)
    return children


def _run_rank(env: dict[str, str], target, args: tuple) -> None:
    os.environ.update(env)
    target(*args)


class Watchdog:
    """Watches the spawned ranks; `on_death(message)` is called once, from its thread."""

    def __init__(self, children: list, on_death, interval_s: float = 1.0) -> None:
        self.children, self.on_death, self.interval_s = children, on_death, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            dead = [p for p in self.children if not p.is_alive()]
            if dead:
                message = "; ".join(f"tensor-parallel rank {p.name.removeprefix('tp-rank-')} (pid {p.pid}) "
                                    f"exited with code {p.exitcode}" for p in dead)
                logger.error("%s: the group cannot compute any more; restart the server", message)
                self.on_death(message)
                return

    def stop(self) -> None:
        self._stop.set()
