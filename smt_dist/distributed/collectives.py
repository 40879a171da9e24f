"""Ranks and the few collectives SMT's setup needs: summing warm-up scores, agreeing, checking values.

A leaf: it imports nothing else of the package, so every layer above may use it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank() -> int:
    """This process's global rank, before the process group exists too (from the launcher's environment)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _from_env(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"), default=0)


def world_size() -> int:
    """The job's world size, before the process group exists too (as its launcher announced it:
    deepspeed and torchrun, MPICH, Open MPI)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _from_env(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"), default=1)


def _from_env(names: tuple[str, ...], *, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must be for a collective of the group: the current GPU under NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(
    tensors: dict[str, torch.Tensor], *, group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """Sum same-shaped tensors over the group in one all-reduce (they are tiny score grids)."""
    if not is_distributed() or not tensors:
        return tensors
    names = sorted(tensors)
    flat = torch.cat([tensors[name].reshape(-1).to(comm_device(group)) for name in names])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = {}, 0
    for name in names:
        numel = tensors[name].numel()
        out[name] = flat[offset : offset + numel].view_as(tensors[name]).to(tensors[name].device)
        offset += numel
    return out


def check_ranks_agree(values: dict[str, Any], *, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold equal ``values`` (a collective call).

    The message names the first key that differs and which ranks hold which value.
    """
    if not is_distributed():
        return
    everyone: list[dict[str, Any] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, values, group=group)
    for key in values:
        seen: dict[str, list[int]] = {}
        for rank, theirs in enumerate(everyone):
            seen.setdefault(repr(theirs.get(key)), []).append(rank)
        if len(seen) > 1:
            holders = "; ".join(
                f"ranks {', '.join(map(str, ranks))} have {value:.120}" for value, ranks in seen.items()
            )
            raise ValueError(f"Ranks disagree on {key} ({holders}); every rank must run the same job.")


def all_finite(tensors: list[torch.Tensor], *, group: dist.ProcessGroup | None = None) -> bool:
    """Whether every tensor is finite on every rank (one all-reduce of a flag)."""
    flag = torch.tensor([float(all(bool(torch.isfinite(t).all()) for t in tensors))])
    if is_distributed():
        flag = flag.to(comm_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
