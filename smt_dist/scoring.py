"""Block scores from weight gradients, without ever keeping a dense gradient.

The warm-up measures how much each ``l x l`` block of each target weight wants to move. A
gradient is reduced to one number per block the moment autograd has accumulated it (a
post-accumulate-grad hook), then dropped, so at most one dense weight gradient exists at a time
and no optimizer state is ever created: warm-up memory stays close to SMT training memory.

Both reductions are sums over micro-batches of per-block quantities, so they commute with summing
over steps and over data-parallel ranks; only the ``out/l x in/l`` accumulators need to travel.
This module is pure tensor code; ``smt_dist.warmup`` runs it and reduces across ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from smt_dist.blocks import block_view


def block_mean_abs(grad: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of ``|G|`` inside every block, ``[out/l, in/l]`` in fp32 (the paper's score)."""
    return block_view(grad.abs(), block_size).mean(dim=(1, 3), dtype=torch.float32)


def block_mean(grad: torch.Tensor, block_size: int) -> torch.Tensor:
    """Signed mean of ``G`` inside every block, ``[out/l, in/l]`` in fp32."""
    return block_view(grad, block_size).mean(dim=(1, 3), dtype=torch.float32)


def finalize_scores(sums: dict[str, torch.Tensor], score: str) -> dict[str, torch.Tensor]:
    """Turn accumulated per-block sums into scores: ``abs_mean`` takes ``|.|`` only at the end."""
    if score == "abs_mean":
        return {name: total.abs() for name, total in sums.items()}
    return dict(sums)


class BlockScoreCollector:
    """Hooks target weights so each accumulated gradient becomes block sums and is then freed.

    Use as a context manager around the warm-up forward and backward passes; ``sums`` holds one
    fp32 ``[out/l, in/l]`` tensor per target. On exit every hook is removed and every target's
    ``.grad`` is ``None``.
    """

    def __init__(self, targets: dict[str, nn.Linear], *, block_size: int, score: str) -> None:
        self.targets = targets
        self.block_size = block_size
        self.reduce = block_mean_abs if score == "mean_abs" else block_mean
        self.sums: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BlockScoreCollector:
        for name, linear in self.targets.items():
            out_features, in_features = linear.weight.shape
            self.sums[name] = torch.zeros(
                out_features // self.block_size,
                in_features // self.block_size,
                dtype=torch.float32,
                device=linear.weight.device,
            )
            self._handles.append(linear.weight.register_post_accumulate_grad_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def reduce_and_free(weight: torch.Tensor) -> None:
            self.sums[name] += self.reduce(weight.grad, self.block_size)
            weight.grad = None

        return reduce_and_free

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for linear in self.targets.values():
            linear.weight.grad = None
