"""Geometry of the ``l x l`` block grid that SMT cuts a weight into.

A weight of shape ``(out, in)`` has ``out/l`` row-blocks and ``in/l`` column-blocks; block
``(r, c)`` covers ``weight[r*l:(r+1)*l, c*l:(c+1)*l]``. Scoring, selection, the sparse layer and
merging all speak in these coordinates, so the conversions live here once, and so does SMT's one
order of blocks (``sort_column_major``): by column-block, then row-block.
"""

from __future__ import annotations

import torch


def weight_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's full shape, also when an engine holds only a partition of it.

    DeepSpeed ZeRO-3 leaves an empty ``weight`` and records the real shape as ``ds_shape``; an
    FSDP2 ``DTensor`` reports its global shape itself; a bitsandbytes 4-bit weight is packed
    (``[out * in / 2, 1]`` bytes) and records its shape in ``quant_state``.
    """
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return torch.Size(state.shape)
    return torch.Size(getattr(weight, "ds_shape", weight.shape))


def block_grid(shape: tuple[int, ...] | torch.Size, block_size: int, *, name: str) -> tuple[int, int]:
    """Number of row- and column-blocks of a 2-D weight, or a ``ValueError`` naming the module."""
    if len(shape) != 2:
        raise ValueError(f"Module '{name}' has a weight of shape {tuple(shape)}; SMT needs 2-D weights.")
    out_features, in_features = shape
    for label, size in (("out_features", out_features), ("in_features", in_features)):
        if size % block_size:
            raise ValueError(
                f"Module '{name}' has {label}={size}, which block size {block_size} does not "
                f"divide; pick a block size that divides every targeted dimension."
            )
    return out_features // block_size, in_features // block_size


def block_view(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """View ``(out, in)`` as ``(out/l, l, in/l, l)`` without copying."""
    out_features, in_features = matrix.shape
    return matrix.view(out_features // block_size, block_size, in_features // block_size, block_size)


def scatter_blocks(
    matrix: torch.Tensor, block_index: torch.Tensor, values: torch.Tensor, *, add: bool
) -> torch.Tensor:
    """Return a copy of ``matrix`` with ``values`` (``[nb, l, l]``) written or added at the blocks."""
    block_size = values.shape[-1]
    out = matrix.clone()
    grid = block_view(out, block_size).permute(0, 2, 1, 3)
    rows, cols = block_index[:, 0], block_index[:, 1]
    values = values.to(out.dtype)
    grid[rows, cols] = grid[rows, cols] + values if add else values
    return out


def gather_blocks(matrix: torch.Tensor, block_index: torch.Tensor, block_size: int) -> torch.Tensor:
    """A copy of the blocks of ``matrix`` at ``block_index``: ``[nb, l, l]``."""
    grid = block_view(matrix, block_size).permute(0, 2, 1, 3)
    return grid[block_index[:, 0], block_index[:, 1]].clone()


def sort_column_major(index: torch.Tensor) -> torch.Tensor:
    """``index`` (``[nb, 2]`` int64 of row-block, column-block) in SMT's one block order.

    By column-block, then row-block: the order ``SparseLinear`` keeps its blocks in, so the blocks
    that read one input column-block sit together, and in which selections are compared and hashed.
    """
    if not len(index):
        return index
    key = index[:, 1] * (int(index[:, 0].max()) + 1) + index[:, 0]
    return index[torch.argsort(key)]
