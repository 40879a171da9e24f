"""The distributed leaf on 2 gloo ranks, each against what one process computes by hand."""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from smt_dist.distributed import all_finite, check_ranks_agree, rank, sum_across_ranks, world_size
from smt_dist.distributed.params import full_value, is_partitioned, local_data, local_rows, read_elements


def test_rank_and_world_size_come_from_the_launcher_before_a_group_exists(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert (rank(), world_size()) == (3, 8)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("PMI_RANK", "1")  # MPICH's names, under mpirun
    monkeypatch.setenv("PMI_SIZE", "2")
    assert (rank(), world_size()) == (1, 2)


def test_outside_a_group_everything_is_local():
    grids = {"a": torch.ones(2, 3)}
    assert sum_across_ranks(grids) is grids
    assert all_finite([torch.zeros(3)]) and not all_finite([torch.tensor([float("nan")])])
    check_ranks_agree({"x": 1})  # nothing to disagree with
    weight = torch.arange(12.0).view(3, 4)
    assert not is_partitioned(weight)
    assert torch.equal(full_value(weight), weight) and torch.equal(local_data(weight), weight)
    assert torch.equal(read_elements(weight, torch.tensor([0, 5, 11])), torch.tensor([0.0, 5.0, 11.0]))


def _collectives_on_rank(rank_: int, world: int) -> None:
    assert (rank(), world_size()) == (rank_, world)
    # Each rank contributes its own grid; the sum is what one process adds up.
    mine = {"q": torch.full((2, 2), float(rank_ + 1)), "v": torch.arange(3.0) * (rank_ + 1)}
    summed = sum_across_ranks(mine)
    assert torch.equal(summed["q"], torch.full((2, 2), 3.0))
    assert torch.equal(summed["v"], torch.arange(3.0) * 3)
    # One rank's NaN makes every rank see a non-finite tensor.
    assert all_finite([torch.zeros(2)])
    assert not all_finite([torch.tensor([float("nan") if rank_ == 1 else 0.0])])
    check_ranks_agree({"same": "yes"})
    with pytest.raises(ValueError, match=r"Ranks disagree on lr \(ranks 0 have 0.1; ranks 1 have 0.2\)"):
        check_ranks_agree({"lr": 0.1 * (rank_ + 1)})


def _dtensor_on_rank(rank_: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(35.0).view(7, 5)  # 7 rows over 2 ranks: 4 and 3, as torch.chunk splits
    sharded = distribute_tensor(full, mesh, [Shard(0)])
    assert is_partitioned(sharded)
    first, count = local_rows(sharded)
    assert (first, count) == ((0, 4) if rank_ == 0 else (4, 3))
    assert torch.equal(local_data(sharded), full[first : first + count])
    positions = torch.tensor([0, 7, 19, 20, 34])  # rows 0, 1, 3 (rank 0) and 4, 6 (rank 1)
    assert torch.equal(read_elements(sharded, positions), full.reshape(-1)[positions])
    assert torch.equal(full_value(sharded), full)


def test_collectives_on_two_ranks():
    run_on_ranks(_collectives_on_rank, 2)


def test_row_sharded_parameters_read_without_gathering_on_two_ranks():
    run_on_ranks(_dtensor_on_rank, 2)
