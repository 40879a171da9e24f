"""Block helpers the tests compare with (``gather_blocks`` is the package's own)."""

from __future__ import annotations

import torch

from smt_dist.core.blocks import gather_blocks, scatter_blocks

__all__ = ["block_mask", "gather_blocks"]


def block_mask(shape: tuple[int, int], block_index: torch.Tensor, block_size: int) -> torch.Tensor:
    """Boolean ``(out, in)`` mask that is true inside the selected blocks."""
    mask = torch.zeros(shape, dtype=torch.bool)
    ones = torch.ones(len(block_index), block_size, block_size, dtype=torch.bool)
    return scatter_blocks(mask, block_index.cpu(), ones, add=False)
