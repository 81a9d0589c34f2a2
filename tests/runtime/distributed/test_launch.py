"""Starting ranks: results in rank order, and a failing or hung rank ends the run with a named error."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tokopt.runtime.distributed.launch import DistributedError, run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([rank])
    dist.all_reduce(t)
    return int(t), rank


def _fails_on_one(rank, world):
    if rank == 1:
        raise ValueError("bad shard")
    dist.barrier()


def _hangs_on_one(rank, world):
    if rank == 1:
        time.sleep(120)
    dist.barrier()


def test_results_in_rank_order():
    assert run_ranks(_sum_ranks, 3) == [(3, 0), (3, 1), (3, 2)]


def test_failing_rank_is_named():
    with pytest.raises(DistributedError, match="rank 1 failed.*bad shard"):
        run_ranks(_fails_on_one, 2, timeout_s=10)


def test_hung_rank_ends_the_run_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"ranks \[1\] had not finished|did not finish"):
        run_ranks(_hangs_on_one, 2, timeout_s=3)
    assert time.monotonic() - start < 30
