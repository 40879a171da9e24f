"""Which rank owns which blocks: a pure function of the block count and the world size.

``BlockShardedAdamW`` gives each rank one contiguous run of whole blocks (over all block
parameters, in param-group order); keeping the rule here, apart from the collectives, lets it be
tested and reasoned about in one process.
"""

from __future__ import annotations

import itertools


def balanced_ranges(count: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` runs of blocks per rank whose sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    bounds = [0]
    for rank in range(world_size):
        bounds.append(bounds[-1] + base + (rank < extra))
    return list(itertools.pairwise(bounds))
