"""Block scores computed inside each target's backward, from its input and output gradient.

The warm-up measures how much each ``l x l`` block of each target weight wants to move. The
weight gradient of a linear for one micro-batch is ``G = dY^T X`` (summed over tokens), so a
block's statistic can be computed where autograd passes ``dY`` back through the layer, with the
layer's input ``X`` at hand, and no weight ever needs a gradient:

- ``abs_mean`` needs only the block sum of ``G``, which is
  ``(dY summed over the block's rows)^T (X summed over the block's columns)``: exact, with no
  dense ``G`` at all, and the forward keeps only ``X`` summed per column-block (``[N, in/l]``).
- ``mean_abs`` (the paper's formula) needs ``|G|`` elementwise, so ``G`` is built one row-block
  (``l x in``) at a time and reduced before the next; the forward keeps ``X`` by reference.

Because no weight requires a gradient, the warm-up runs unchanged on weights that an engine
partitions (DeepSpeed ZeRO-3, FSDP2): the engine gathers each weight for the layer's own forward
and backward, exactly as it does in training, and no dense gradient is created or reduced. Both
statistics are sums over micro-batches of per-block quantities, so they also commute with summing
over data-parallel ranks: only the ``out/l x in/l`` grids travel. This module is pure tensor code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from smt_dist.core.blocks import block_grid, weight_shape
from smt_dist.core.quantized import keep_layout


def column_block_sums(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``X`` (``[..., in]``) summed inside every column-block: ``[N, in/l]`` in fp32."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d.view(x2d.shape[0], -1, block_size).sum(-1, dtype=torch.float32)


def block_grad_sums(x_cols: torch.Tensor, grad_y: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of ``G = dY^T X`` inside every block, ``[out/l, in/l]``, from ``X``'s column-block sums."""
    dy_rows = column_block_sums(grad_y, block_size)  # [N, out/l]
    return dy_rows.transpose(0, 1) @ x_cols


def block_abs_grad_sums(x: torch.Tensor, grad_y: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of ``|G|`` inside every block, ``[out/l, in/l]``; ``G`` exists one row-block at a time."""
    x2d = x.reshape(-1, x.shape[-1]).float()
    dy = grad_y.reshape(-1, grad_y.shape[-1])
    n_rows = dy.shape[-1] // block_size
    out = torch.empty(n_rows, x2d.shape[-1] // block_size, dtype=torch.float32, device=x2d.device)
    for r in range(n_rows):
        rows = dy[:, r * block_size : (r + 1) * block_size].float()  # [N, l]
        g = rows.transpose(0, 1) @ x2d  # [l, in]: one row-block of G
        out[r] = g.abs().view(block_size, -1, block_size).sum(dim=(0, 2))
    return out


def finalize_scores(sums: dict[str, torch.Tensor], score: str, block_size: int) -> dict[str, torch.Tensor]:
    """Per-block sums over micro-batches (and ranks) to scores: block means, ``|.|`` last for ``abs_mean``."""
    area = float(block_size * block_size)
    if score == "abs_mean":
        return {name: (total / area).abs() for name, total in sums.items()}
    return {name: total / area for name, total in sums.items()}


class _ScoreProbe(torch.autograd.Function):
    """Identity on a target's output whose backward hands ``(saved, dY)`` to an accumulator.

    ``anchor`` is a leaf that requires grad, so the output joins the autograd graph even though
    no weight requires grad; its gradient is never computed (``None``).
    """

    @staticmethod
    def forward(ctx, y, anchor, saved, accumulate):
        ctx.save_for_backward(saved)
        ctx.accumulate = accumulate
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        (saved,) = ctx.saved_tensors
        ctx.accumulate(saved, grad_y)
        return grad_y, None, None, None


class BlockScoreProbes:
    """Hooks every target so its backward adds its block statistic to ``sums``; nothing else trains.

    Use as a context manager around the warm-up's forward and backward passes. On entry every
    parameter of ``model`` is frozen (and restored on exit); ``sums`` holds one fp32
    ``[out/l, in/l]`` tensor per target: summed ``G`` per block for ``abs_mean``, summed ``|G|``
    for ``mean_abs`` (divide with ``finalize_scores``). A target called more than once in one
    forward contributes once per call.
    """

    def __init__(
        self, model: nn.Module, targets: dict[str, nn.Linear], *, block_size: int, score: str
    ) -> None:
        self.model = model
        self.targets = targets
        self.block_size = block_size
        self.score = score
        self.sums: dict[str, torch.Tensor] = {}
        self._anchor: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._flags: dict[nn.Parameter, bool] = {}

    def __enter__(self) -> BlockScoreProbes:
        self._flags = {p: p.requires_grad for p in self.model.parameters()}
        for param in self._flags:
            param.requires_grad_(False)
        device = next(iter(self.targets.values())).weight.device
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        keep_layout(self.model)  # 4-bit weights stay as loaded through an eval-mode warm-up
        for name, linear in self.targets.items():
            n_rows, n_cols = block_grid(weight_shape(linear.weight), self.block_size, name=name)
            self.sums[name] = torch.zeros(n_rows, n_cols, dtype=torch.float32, device=device)
            self._handles.append(linear.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable:
        l = self.block_size
        total = self.sums[name]
        if self.score == "abs_mean":

            def keep(x: torch.Tensor) -> torch.Tensor:
                return column_block_sums(x.detach(), l)

            def accumulate(x_cols: torch.Tensor, grad_y: torch.Tensor) -> None:
                total.add_(block_grad_sums(x_cols, grad_y, l).to(total.device))

        else:

            def keep(x: torch.Tensor) -> torch.Tensor:
                return x.detach()

            def accumulate(x: torch.Tensor, grad_y: torch.Tensor) -> None:
                total.add_(block_abs_grad_sums(x, grad_y, l).to(total.device))

        def probe(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            return _ScoreProbe.apply(output, self._anchor, keep(args[0]), accumulate)

        return probe

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in self._flags.items():
            param.requires_grad_(flag)
        self._anchor = None
