"""The few collectives SMT's setup needs: summing warm-up scores and agreeing on a selection."""

from __future__ import annotations

import torch
import torch.distributed as dist

from smt_dist.selection import BlockSelection


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def check_same_selection(selection: BlockSelection, *, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank unless all ranks of the group selected exactly the same blocks."""
    if not is_distributed():
        return
    digests: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, selection.digest(), group=group)
    if len(set(digests)) != 1:
        mine = dist.get_rank(group)
        raise RuntimeError(
            f"Ranks selected different blocks (rank {mine} has {digests[mine][:12]}, digests "
            f"{sorted({d[:12] for d in digests})}); the warm-up scores were not identical."
        )
