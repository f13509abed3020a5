"""TensorParallelGroup's collectives over real gloo in two processes (started once for the
module), against plain single-process arithmetic: the ordered sum, the gather of the
vocabulary's logits, the command channel, and `check_same`, which must fail on ranks that
differ (its negative control)."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 5, generator=gen), torch.randn(2, 4, generator=gen)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from ascend_dspark.distributed import TensorParallelError, join
    from ascend_dspark.platform import make_platform

    tp = join(make_platform("cpu"), 2)
    partial, logits = _inputs(rank)
    result = {"sum": tp.sum_partials(partial).tolist(), "gathered": tp.gather_last_dim(logits).tolist()}
    if tp.is_driver:
        tp.send_command(("verify", ([1, 2],), {"ahead": 3}))
    else:
        result["command"] = tp.receive_command()
    tp.check_same("equal tokens", torch.tensor([4, 5]))                  # must pass everywhere
    try:
        tp.check_same("the sampled tokens", torch.tensor([4, 5 + rank]))  # rank 1 differs
        result["differ"] = "passed"
    except TensorParallelError as exc:
        result["differ"] = str(exc)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    # Leave without the interpreter's teardown: gloo's threads outliving it can abort the
    # process at exit ("terminate called without an active exception") once the work is done.
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("group") / "rank")
    sys.path.insert(0, os.getcwd())
    # The free port is released before the ranks bind it: a process beside this one (another
    # test worker's group) may take it meanwhile, so a failed start tries a second port.
    for attempt in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
            break
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt:
                raise
    return [json.load(open(f"{out}.{r}")) for r in range(2)]


def test_sum_partials_is_the_rank_ordered_sum_on_both_ranks(ranks):
    expected = _inputs(0)[0] + _inputs(1)[0]
    for r in ranks:
        assert torch.equal(torch.tensor(r["sum"]), expected)


def test_gather_last_dim_puts_the_ranks_side_by_side(ranks):
    expected = torch.cat([_inputs(0)[1], _inputs(1)[1]], dim=-1)
    for r in ranks:
        assert torch.equal(torch.tensor(r["gathered"]), expected)


def test_commands_reach_the_other_rank(ranks):
    assert ranks[1]["command"] == ["verify", [[1, 2]], {"ahead": 3}]


def test_check_same_fails_on_the_rank_that_differs(ranks):
    assert ranks[0]["differ"] == "passed"                 # the driver never reads the result
    assert "rank 1: the sampled tokens differ from rank 0's ([4, 6] vs [4, 5])" in ranks[1]["differ"]
