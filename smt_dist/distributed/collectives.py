"""The few collectives SMT's setup needs: summing warm-up scores, agreeing, checking values."""

from __future__ import annotations

from typing import Any

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


def check_same_selection(selection: BlockSelection, *, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank unless all ranks of the group selected exactly the same blocks."""
    check_ranks_agree({"the selected blocks (digest)": selection.digest()[:16]}, group=group)


def all_finite(tensors: list[torch.Tensor], *, group: dist.ProcessGroup | None = None) -> bool:
    """Whether every tensor is finite on every rank (one all-reduce of a flag)."""
    flag = torch.tensor([float(all(bool(torch.isfinite(t).all()) for t in tensors))])
    if is_distributed():
        flag = flag.to(comm_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
