"""``BlockShardedAdamW``: AdamW over SMT blocks, sharded by whole blocks across ranks.

In a torchrun or mpirun job without DDP, every rank computes gradients for all of its blocks
locally. ``step()`` then owns the whole exchange, and only the selected blocks ever travel:

1. pack each rank's block gradients in *owner order* (rank 0's blocks first) into buckets, one
   equal slice per rank, padded where a rank owns fewer blocks;
2. reduce-scatter each bucket, so each rank receives the sum of the gradients of the blocks it
   owns, and divide by the world size (gradients are averaged, as DDP does);
3. optionally clip by the global gradient norm (one all-reduced scalar);
4. run AdamW (``smt_dist.optim.adamw``) on fp32 master copies of the owned blocks only, so
   master weights and moments cost about ``1/world`` of the selected blocks on each rank;
5. all-gather the updated blocks, in the parameters' dtype, back into every rank's parameters.

Ownership is by contiguous runs of whole blocks over all block parameters in order, balanced by
element count. With no process group (or one rank) the same code runs without collectives.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from smt_dist.optim.adamw import adamw_update_


@dataclass(frozen=True)
class _Block:
    """One whole block: which parameter, which block of it, which param group."""

    param: int
    index: int
    group: int


class BlockShardedAdamW(torch.optim.Optimizer):
    """AdamW whose state and update are sharded across ranks by whole SMT blocks.

    Args:
        params: Block parameters (``[nb, l, l]``, e.g. ``SparseLinear.blocks``) or param groups.
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW``.
        max_grad_norm: Clip the averaged gradient to this global L2 norm (``None``: no clipping).
        bucket_size_mb: Upper bound on one reduce-scatter's buffer, in MiB.
        offload: ``"cpu"`` keeps master weights and moments in host memory.
        reduce_dtype: dtype gradients are averaged in (default fp32, whatever the blocks' dtype).
        group: Data-parallel process group (default: the world, when initialised).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        max_grad_norm: float | None = None,
        bucket_size_mb: float = 25.0,
        offload: str | None = None,
        reduce_dtype: torch.dtype = torch.float32,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"Invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}."
            )
        if offload not in (None, "cpu"):
            raise ValueError(f"offload must be None or 'cpu', got {offload!r}.")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        self.offload = offload
        self.reduce_dtype = reduce_dtype
        self.group = group
        self.bytes_last_step = 0
        """Bytes this rank put into (reduce-scatter) and got out of (all-gather) collectives in
        the last ``step()``: the padded block buffers, plus 8 for the gradient-norm scalar."""
        self.last_grad_norm: float | None = None

        self._params = [p for group_ in self.param_groups for p in group_["params"]]
        shapes = {tuple(p.shape[1:]) for p in self._params}
        if any(p.ndim != 3 or p.shape[1] != p.shape[2] for p in self._params) or len(shapes) != 1:
            raise ValueError("BlockShardedAdamW takes SMT block parameters of one shape [nb, l, l].")
        self.block_size = self._params[0].shape[-1]
        group_of = {id(p): g for g, group_ in enumerate(self.param_groups) for p in group_["params"]}
        self._blocks = [
            _Block(param=i, index=k, group=group_of[id(p)])
            for i, p in enumerate(self._params)
            for k in range(len(p))
        ]
        self.world_size = dist.get_world_size(group) if _distributed(group) else 1
        self.rank = dist.get_rank(group) if _distributed(group) else 0
        self._owned_ranges = _balanced_ranges(len(self._blocks), self.world_size)
        start, stop = self._owned_ranges[self.rank]
        self.owned = self._blocks[start:stop]
        """The blocks whose master weights and moments live on this rank."""
        self._slots = max(stop - start for start, stop in self._owned_ranges)  # padded blocks per rank
        self._step = 0
        state_device = torch.device("cpu") if offload == "cpu" else self._params[0].device
        self._master = self._gather_owned(state_device)
        self._exp_avg = torch.zeros_like(self._master)
        self._exp_avg_sq = torch.zeros_like(self._master)

    # ---- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step += 1
        self.bytes_last_step = 0
        grads = self._reduce_scatter_grads()  # [owned, l, l] averaged, in reduce_dtype
        grads = grads.to(self._master.device, torch.float32)
        if self.max_grad_norm is not None:
            self._clip_(grads)
        for slot, block in enumerate(self.owned):
            group = self.param_groups[block.group]
            beta1, beta2 = group["betas"]
            adamw_update_(
                self._master[slot],
                grads[slot],
                self._exp_avg[slot],
                self._exp_avg_sq[slot],
                step=self._step,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        self._all_gather_params()
        return loss

    def _reduce_scatter_grads(self) -> torch.Tensor:
        device = self._params[0].device
        l = self.block_size
        per_bucket = max(1, self.bucket_bytes // (self.world_size * l * l * _itemsize(self.reduce_dtype)))
        owned = torch.zeros(len(self.owned), l, l, dtype=self.reduce_dtype, device=device)
        for first in range(0, self._slots, per_bucket):
            slots = range(first, min(first + per_bucket, self._slots))
            bucket = torch.zeros(self.world_size, len(slots), l, l, dtype=self.reduce_dtype, device=device)
            for rank, (start, stop) in enumerate(self._owned_ranges):
                for column, slot in enumerate(slots):
                    if start + slot < stop:
                        block = self._blocks[start + slot]
                        grad = self._params[block.param].grad
                        if grad is not None:
                            bucket[rank, column].copy_(grad[block.index])
            if self.world_size > 1:
                mine = torch.empty(len(slots), l, l, dtype=self.reduce_dtype, device=device)
                _reduce_scatter(mine, bucket.view(-1, l, l), group=self.group)
                self.bytes_last_step += bucket.numel() * bucket.element_size()
                mine.div_(self.world_size)
            else:
                mine = bucket[0]
            kept = [s for s in slots if s < len(self.owned)]
            if kept:
                owned[kept[0] : kept[-1] + 1] = mine[: len(kept)]
        return owned

    def _clip_(self, grads: torch.Tensor) -> None:
        square = grads.double().square().sum().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(square, group=self.group)
            self.bytes_last_step += square.element_size()
        norm = square.sqrt().item()
        self.last_grad_norm = norm
        coefficient = self.max_grad_norm / (norm + 1e-6)
        if coefficient < 1:
            grads.mul_(coefficient)

    def _all_gather_params(self) -> None:
        param = self._params[0]
        everyone = self._from_owners(self._master, param.dtype, count_bytes=True)
        for rank, slot, block in self._owner_slots():
            self._params[block.param][block.index].copy_(everyone[rank, slot])

    def _from_owners(self, owned: torch.Tensor, dtype: torch.dtype, *, count_bytes: bool) -> torch.Tensor:
        """Every rank's owned blocks, ``[world, slots, l, l]`` in ``dtype`` (an all-gather)."""
        device = self._params[0].device
        l = self.block_size
        mine = torch.zeros(self._slots, l, l, dtype=dtype, device=device)
        mine[: len(self.owned)] = owned.to(device, dtype)
        if self.world_size == 1:
            return mine.unsqueeze(0)
        everyone = torch.empty(self.world_size * self._slots, l, l, dtype=dtype, device=device)
        _all_gather(everyone, mine, group=self.group)
        if count_bytes:
            self.bytes_last_step += everyone.numel() * everyone.element_size()
        return everyone.view(self.world_size, self._slots, l, l)

    def _owner_slots(self):
        """``(rank, slot, block)`` for every block, in owner order."""
        for rank, (start, stop) in enumerate(self._owned_ranges):
            for slot, block in enumerate(self._blocks[start:stop]):
                yield rank, slot, block

    def _gather_owned(self, device: torch.device) -> torch.Tensor:
        l = self.block_size
        master = torch.empty(len(self.owned), l, l, dtype=torch.float32, device=device)
        for slot, block in enumerate(self.owned):
            master[slot].copy_(self._params[block.param][block.index].detach())
        return master

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: its owned blocks' master weights and moments (save one per rank)."""
        return {
            "format": "sharded",
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self._step,
            "master": self._master.clone(),
            "exp_avg": self._exp_avg.clone(),
            "exp_avg_sq": self._exp_avg_sq.clone(),
            "param_groups": self._group_hyperparameters(),
        }

    def consolidated_state_dict(self) -> dict[str, Any]:
        """The whole optimizer state on every rank (a collective call), loadable at any world size.

        Per parameter: ``exp_avg``, ``exp_avg_sq`` and ``master`` shaped like the parameter.
        """
        full = {
            name: self._gather_full(getattr(self, f"_{name}")) for name in ("master", "exp_avg", "exp_avg_sq")
        }
        return {
            "format": "consolidated",
            "step": self._step,
            "state": {
                i: {name: values[i] for name, values in full.items()} for i in range(len(self._params))
            },
            "param_groups": self._group_hyperparameters(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a sharded state saved at the same world size, or a consolidated one at any size."""
        fmt = state_dict.get("format")
        if fmt == "sharded":
            if state_dict["world_size"] != self.world_size or state_dict["rank"] != self.rank:
                raise ValueError(
                    f"A sharded state of rank {state_dict['rank']} of {state_dict['world_size']} cannot load "
                    f"on rank {self.rank} of {self.world_size}; save consolidated_state_dict() to change size."
                )
            tensors = {name: state_dict[name] for name in ("master", "exp_avg", "exp_avg_sq")}
        elif fmt == "consolidated":
            if len(state_dict["state"]) != len(self._params):
                raise ValueError(
                    f"The state holds {len(state_dict['state'])} parameters, this optimizer {len(self._params)}."
                )
            tensors = {
                name: torch.stack([state_dict["state"][b.param][name][b.index] for b in self.owned])
                if self.owned
                else torch.empty(0, self.block_size, self.block_size)
                for name in ("master", "exp_avg", "exp_avg_sq")
            }
        else:
            raise ValueError("Not a BlockShardedAdamW state dict (no 'format' of sharded/consolidated).")
        for name, value in tensors.items():
            target = getattr(self, f"_{name}")
            if value.shape != target.shape:
                raise ValueError(
                    f"State '{name}' has shape {tuple(value.shape)}, expected {tuple(target.shape)}."
                )
            target.copy_(value)
        self._step = int(state_dict["step"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update(saved)
        with torch.no_grad():
            self._all_gather_params()

    def _group_hyperparameters(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]

    def _gather_full(self, owned: torch.Tensor) -> list[torch.Tensor]:
        everyone = self._from_owners(owned, torch.float32, count_bytes=False)
        full = [torch.zeros(p.shape, dtype=torch.float32) for p in self._params]
        for rank, slot, block in self._owner_slots():
            full[block.param][block.index] = everyone[rank, slot].cpu()
        return full


def _reduce_scatter(output: torch.Tensor, input_: torch.Tensor, *, group: dist.ProcessGroup | None) -> None:
    # torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single; older releases lack it.
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, input_, group=group)


def _all_gather(output: torch.Tensor, input_: torch.Tensor, *, group: dist.ProcessGroup | None) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, input_, group=group)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _balanced_ranges(count: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` runs of blocks per rank whose sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    bounds = [0]
    for rank in range(world_size):
        bounds.append(bounds[-1] + base + (rank < extra))
    return list(itertools.pairwise(bounds))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
