"""``BlockShardedAdamW``: AdamW over SMT blocks, sharded by whole blocks across ranks.

In a torchrun or mpirun job without DDP, every rank computes gradients for all of its blocks
locally. ``step()`` then owns the whole exchange, and only the selected blocks ever travel:

1. pack every block gradient into one buffer in *owner order* (rank 0's blocks first), one equal
   run of slots per rank, padded where a rank owns fewer blocks;
2. reduce-scatter it in buckets, so each rank receives the sum of the gradients of the blocks it
   owns, and divide by the world size (gradients are averaged, as DDP does);
3. optionally clip by the global gradient norm (one all-reduced scalar);
4. run AdamW on the owned blocks only, so moments (and fp32 masters of low-precision blocks) cost
   about ``1/world`` of the selected blocks on each rank;
5. all-gather the updated blocks, in the parameters' dtype, back into every rank's parameters.

Ownership is by contiguous runs of whole blocks over all block parameters, ordered by param group,
balanced by count. No step loops over blocks: packing and unpacking go through index tensors
computed once, and the update is one call per param group over the owned parts of its parameters
(``torch._fused_adamw_`` where torch has it, else the pure ``smt_dist.optim.adamw`` function per
part). fp32 blocks are their own masters: the owned parts of the parameters are updated in place.
With no process group (or one rank) the same code runs without collectives.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from smt_dist.distributed.collectives import is_distributed
from smt_dist.optim.adamw import adamw_update_
from smt_dist.optim.ownership import balanced_ranges

_STATE = ("master", "exp_avg", "exp_avg_sq")


class BlockShardedAdamW(torch.optim.Optimizer):
    """AdamW whose state and update are sharded across ranks by whole SMT blocks.

    Args:
        params: Block parameters (``[nb, l, l]``, e.g. ``SparseLinear.blocks``) or param groups.
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW``.
        max_grad_norm: Clip the averaged gradient to this global L2 norm (``None``: no clipping).
        bucket_size_mb: Upper bound on one reduce-scatter's buffer, in MiB.
        offload: ``"cpu"`` keeps masters and moments in host memory.
        reduce_dtype: dtype gradients are averaged in (default fp32, whatever the blocks' dtype).
        fused: Update with torch's fused AdamW kernel (bit for bit ``torch.optim.AdamW(fused=True)``)
            or, if ``False``, with the pure per-tensor function (bit for bit ``torch.optim.AdamW()``
            on the CPU). Default: fused where torch has the kernel for the state's device.
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
        fused: bool | None = None,
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
        self.last_grad_norm: float | None = None  # the last step's global norm, before clipping
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        self.offload = offload
        self.reduce_dtype = reduce_dtype
        self.group = group
        self.bytes_last_step = 0
        """Bytes this rank put into (reduce-scatter) and got out of (all-gather) collectives in
        the last ``step()``: the padded block buffers, plus 8 for the gradient-norm scalar."""

        # Param groups in order, each group's params in order: a rank's owned blocks of one group
        # are then one contiguous run.
        self._params = [p for group_ in self.param_groups for p in group_["params"]]
        shapes = {tuple(p.shape[1:]) for p in self._params}
        if any(p.ndim != 3 or p.shape[1] != p.shape[2] for p in self._params) or len(shapes) != 1:
            raise ValueError("BlockShardedAdamW takes SMT block parameters of one shape [nb, l, l].")
        if len({p.dtype for p in self._params}) != 1 or len({p.device for p in self._params}) != 1:
            raise ValueError("BlockShardedAdamW takes block parameters of one dtype on one device.")
        self.block_size = self._params[0].shape[-1]
        self.dtype, self.device = self._params[0].dtype, self._params[0].device
        self._counts = [len(p) for p in self._params]
        self.world_size = dist.get_world_size(group) if is_distributed(group) else 1
        self.rank = dist.get_rank(group) if is_distributed(group) else 0
        self._ranges = balanced_ranges(sum(self._counts), self.world_size)
        start, stop = self._ranges[self.rank]
        self.num_owned = stop - start
        """How many blocks' moments (and masters) live on this rank."""
        self._slots = max(b - a for a, b in self._ranges)  # padded blocks per rank
        # Where every block (in parameter order) sits in the padded [world * slots] exchange buffer.
        self._padded_index = torch.cat(
            [torch.arange(a, b) - a + r * self._slots for r, (a, b) in enumerate(self._ranges)]
        ).to(self.device)
        # The owned parts of the parameters, (param, first block, stop block), per param group.
        first_block = list(itertools.accumulate(self._counts, initial=0))
        owner_of = {id(p): g for g, group_ in enumerate(self.param_groups) for p in group_["params"]}
        self._parts: list[list[tuple[int, int, int]]] = [[] for _ in self.param_groups]
        for i, p in enumerate(self._params):
            lo, hi = max(start, first_block[i]), min(stop, first_block[i + 1])
            if lo < hi:
                self._parts[owner_of[id(p)]].append((i, lo - first_block[i], hi - first_block[i]))
        state_device = torch.device("cpu") if offload == "cpu" else self.device
        self.fused = _fused_supported(state_device) if fused is None else fused
        self._step = 0
        # fp32 blocks on their own device are their own masters; otherwise keep fp32 masters.
        needs_master = self.dtype != torch.float32 or state_device != self.device
        self._master = self._owned_values().to(state_device) if needs_master else None
        self._exp_avg = torch.zeros(self.num_owned, self.block_size, self.block_size, device=state_device)
        self._exp_avg_sq = torch.zeros_like(self._exp_avg)
        self._step_tensor = torch.zeros((), dtype=torch.float32, device=state_device)

    # ---- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step += 1
        self._step_tensor.fill_(self._step)
        self.bytes_last_step = 0
        direct = self.world_size == 1 and self._master is None
        if direct:  # one process, fp32: update the parameters themselves, nothing is copied
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        else:
            owned = self._reduce_scatter_grads().to(self._exp_avg.device, torch.float32)
            grads = list(torch.split(owned, self._part_counts()))
        if self.max_grad_norm is not None:
            self._clip_(grads)
        targets = self._targets()
        moments = [torch.split(m, self._part_counts()) for m in (self._exp_avg, self._exp_avg_sq)]
        position = 0
        for group, parts in zip(self.param_groups, self._parts, strict=True):
            span = slice(position, position + len(parts))
            position += len(parts)
            if parts:
                self._update(targets[span], grads[span], moments[0][span], moments[1][span], group)
        if not direct:
            values = self._master if self._master is not None else self._owned_values()
            self._write_params(self._from_owners(values, self.dtype, count_bytes=True))
        return loss

    def _part_counts(self) -> list[int]:
        return [b - a for parts in self._parts for _, a, b in parts]

    def _targets(self) -> list[torch.Tensor]:
        """What the update writes: views of the master, or of the parameters' owned parts."""
        if self._master is not None:
            return list(torch.split(self._master, self._part_counts()))
        return [self._params[i][a:b] for parts in self._parts for i, a, b in parts]

    def _update(self, params, grads, exp_avgs, exp_avg_sqs, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        if self.fused:
            torch._fused_adamw_(
                list(params),
                list(grads),
                list(exp_avgs),
                list(exp_avg_sqs),
                [],
                [self._step_tensor] * len(params),
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
            return
        for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
            adamw_update_(
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                step=self._step,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )

    def _reduce_scatter_grads(self) -> torch.Tensor:
        """This rank's owned block gradients, summed over ranks and averaged: ``[owned, l, l]``."""
        l = self.block_size
        packed = torch.zeros(self.world_size * self._slots, l, l, dtype=self.reduce_dtype, device=self.device)
        offset = 0
        for p, count in zip(self._params, self._counts, strict=True):
            if p.grad is not None:
                packed.index_copy_(
                    0, self._padded_index[offset : offset + count], p.grad.to(self.reduce_dtype)
                )
            offset += count
        if self.world_size == 1:
            return packed[: self.num_owned]
        packed = packed.view(self.world_size, self._slots, l, l)
        per_bucket = max(1, self.bucket_bytes // (self.world_size * l * l * packed.element_size()))
        mine = torch.empty(self._slots, l, l, dtype=self.reduce_dtype, device=self.device)
        for first in range(0, self._slots, per_bucket):
            last = min(first + per_bucket, self._slots)
            bucket = packed[:, first:last].contiguous()
            _reduce_scatter(mine[first:last], bucket.view(-1, l, l), group=self.group)
            self.bytes_last_step += bucket.numel() * bucket.element_size()
        return mine[: self.num_owned].div_(self.world_size)

    def _clip_(self, grads: list[torch.Tensor]) -> None:
        norms = torch._foreach_norm([g.double() for g in grads]) if grads else []
        square = (
            torch.stack(norms).square().sum().reshape(1) if norms else torch.zeros(1, dtype=torch.float64)
        )
        if self.world_size > 1:
            square = square.to(self.device)
            dist.all_reduce(square, group=self.group)
            self.bytes_last_step += square.element_size()
        self.last_grad_norm = square.sqrt().item()
        coefficient = self.max_grad_norm / (self.last_grad_norm + 1e-6)
        if coefficient < 1:
            torch._foreach_mul_(grads, coefficient)

    def _owned_values(self) -> torch.Tensor:
        """The current values of this rank's owned blocks, in fp32: ``[owned, l, l]``."""
        parts = [self._params[i][a:b].detach() for parts in self._parts for i, a, b in parts]
        if not parts:
            return torch.empty(0, self.block_size, self.block_size, device=self.device)
        return torch.cat(parts).float()

    def _from_owners(self, owned: torch.Tensor, dtype: torch.dtype, *, count_bytes: bool) -> torch.Tensor:
        """Every block, gathered from its owner, in parameter order: ``[blocks, l, l]`` in ``dtype``."""
        l = self.block_size
        mine = torch.zeros(self._slots, l, l, dtype=dtype, device=self.device)
        mine[: self.num_owned] = owned.to(self.device, dtype)
        if self.world_size == 1:
            return mine[: self.num_owned]
        everyone = torch.empty(self.world_size * self._slots, l, l, dtype=dtype, device=self.device)
        _all_gather(everyone, mine, group=self.group)
        if count_bytes:
            self.bytes_last_step += everyone.numel() * everyone.element_size()
        return everyone.index_select(0, self._padded_index)

    def _write_params(self, blocks: torch.Tensor) -> None:
        """Copy ``[blocks, l, l]`` in parameter order into the parameters (one foreach copy)."""
        torch._foreach_copy_(self._params, list(torch.split(blocks, self._counts)))

    # ---- state --------------------------------------------------------------------------------

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        master = self._master if self._master is not None else self._owned_values()
        return {"master": master, "exp_avg": self._exp_avg, "exp_avg_sq": self._exp_avg_sq}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: its owned blocks' fp32 values and moments (save one per rank)."""
        return {
            "format": "sharded",
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self._step,
            **{name: value.detach().cpu().clone() for name, value in self._state_tensors().items()},
            "param_groups": self._group_hyperparameters(),
        }

    def consolidated_state_dict(self) -> dict[str, Any]:
        """The whole optimizer state on every rank (a collective call), loadable at any world size.

        Per parameter: ``exp_avg``, ``exp_avg_sq`` and ``master`` (fp32 values) shaped like it.
        """
        full = {
            name: torch.split(self._from_owners(owned, torch.float32, count_bytes=False).cpu(), self._counts)
            for name, owned in self._state_tensors().items()
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
            tensors = {name: state_dict[name] for name in _STATE}
        elif fmt == "consolidated":
            if len(state_dict["state"]) != len(self._params):
                raise ValueError(
                    f"The state holds {len(state_dict['state'])} parameters, this optimizer {len(self._params)}."
                )
            start, stop = self._ranges[self.rank]
            tensors = {
                name: torch.cat([state_dict["state"][i][name] for i in range(len(self._params))])[start:stop]
                for name in _STATE
            }
        else:
            raise ValueError("Not a BlockShardedAdamW state dict (no 'format' of sharded/consolidated).")
        expected = (self.num_owned, self.block_size, self.block_size)
        for name, value in tensors.items():
            if tuple(value.shape) != expected:
                raise ValueError(f"State '{name}' has shape {tuple(value.shape)}, expected {expected}.")
        self._exp_avg.copy_(tensors["exp_avg"])
        self._exp_avg_sq.copy_(tensors["exp_avg_sq"])
        if self._master is not None:
            self._master.copy_(tensors["master"])
        self._step = int(state_dict["step"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update(saved)
        with torch.no_grad():
            self._write_params(self._from_owners(tensors["master"].float(), self.dtype, count_bytes=False))

    def _group_hyperparameters(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]


def _fused_supported(device: torch.device) -> bool:
    """Whether torch has its fused AdamW kernel for this device."""
    return hasattr(torch, "_fused_adamw_") and device.type in ("cpu", "cuda")


def _reduce_scatter(output: torch.Tensor, input_: torch.Tensor, *, group: dist.ProcessGroup | None) -> None:
    # torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single; older releases lack it.
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, input_, group=group)


def _all_gather(output: torch.Tensor, input_: torch.Tensor, *, group: dist.ProcessGroup | None) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, input_, group=group)
