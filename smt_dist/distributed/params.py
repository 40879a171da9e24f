"""Reading parameters that an engine partitions across ranks, without gathering whole weights.

DeepSpeed ZeRO-3 keeps each rank's flat partition of a parameter in ``param.ds_tensor`` (rank
``r`` holds flat elements ``[r * p, (r + 1) * p)``, padded at the end); FSDP2 keeps a ``DTensor``
sharded by rows. ``read_elements`` fetches a few elements of a weight (the adapter's base
fingerprint) by summing each rank's contribution in one small all-reduce; ``full_value`` gathers
one whole parameter, for the block parameters that an adapter saves; ``gathered`` holds ZeRO-3
parameters gathered for a block of code. All are collective calls for partitioned parameters and
plain indexing otherwise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from smt_dist.distributed.collectives import comm_device


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 partitioned parameter or an FSDP2 ``DTensor``."""
    return hasattr(param, "ds_tensor") or isinstance(param, DTensor)


def local_data(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds (all of it when it is not partitioned)."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.detach()
    if isinstance(param, DTensor):
        return param.to_local().detach()
    return param.detach()


def read_elements(param: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Elements at flat ``positions`` (int64) of the full parameter, as fp32 on the CPU."""
    positions = positions.to("cpu", torch.int64)
    if hasattr(param, "ds_tensor"):
        group = param.ds_process_group
        local = param.ds_tensor.detach()  # this rank's flat, padded partition
        start = local.numel() * dist.get_rank(group)
        inside = (positions >= start) & (positions < start + local.numel())
        return _sum_contributions(local.reshape(-1), positions - start, inside, group)
    if isinstance(param, DTensor):
        cols = math.prod(param.shape[1:])
        first, count = local_rows(param)
        row = positions // cols
        inside = (row >= first) & (row < first + count)
        local = param.to_local().detach().reshape(-1)
        return _sum_contributions(local, positions - first * cols, inside, param.device_mesh.get_group())
    return param.detach().reshape(-1)[positions.to(param.device)].float().cpu()


def full_value(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter on every rank (gathered when partitioned), detached, on the CPU."""
    if hasattr(param, "ds_tensor"):
        with gathered([param]):
            return param.detach().cpu().clone()
    if isinstance(param, DTensor):
        return param.detach().full_tensor().cpu()
    return param.detach().cpu()


def local_rows(param: DTensor) -> tuple[int, int]:
    """First row and row count of this rank's shard of a row-sharded ``DTensor``."""
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"Only row-sharded DTensors are supported, got placements {param.placements}.")
    rows = param.shape[0]
    world = param.device_mesh.size()
    chunk = -(-rows // world)  # torch.chunk's split: ceil(rows / world) rows per rank
    first = min(chunk * param.device_mesh.get_local_rank(), rows)
    return first, param.to_local().shape[0]


def _sum_contributions(
    local: torch.Tensor, offsets: torch.Tensor, inside: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Each rank fills the positions it holds, zeros elsewhere; one all-reduce sums them."""
    device = comm_device(group)
    values = torch.zeros(len(offsets), dtype=torch.float32, device=device)
    if inside.any():
        values[inside.to(device)] = local[offsets[inside].to(local.device)].float().to(device)
    dist.all_reduce(values, group=group)
    return values.cpu()


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3 partitioned parameters inside the block (a collective call)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed  # only DeepSpeed makes parameters with a ds_id

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
