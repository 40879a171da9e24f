"""Block helpers the tests compare with: the package itself never needs them."""

from __future__ import annotations

import torch

from smt_dist.core.blocks import block_view, scatter_blocks


def gather_blocks(matrix: torch.Tensor, block_index: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy the blocks at ``block_index`` (``[nb, 2]`` of row, col) out as ``[nb, l, l]``."""
    grid = block_view(matrix, block_size).permute(0, 2, 1, 3)
    return grid[block_index[:, 0], block_index[:, 1]]


def block_mask(shape: tuple[int, int], block_index: torch.Tensor, block_size: int) -> torch.Tensor:
    """Boolean ``(out, in)`` mask that is true inside the selected blocks."""
    mask = torch.zeros(shape, dtype=torch.bool)
    ones = torch.ones(len(block_index), block_size, block_size, dtype=torch.bool)
    return scatter_blocks(mask, block_index.cpu(), ones, add=False)
