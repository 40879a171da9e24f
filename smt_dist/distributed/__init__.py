"""Everything that talks to ``torch.distributed``: ranks, collectives, partitioned parameters, launch.

A leaf of the package: it imports nothing above it, and the method itself (``smt_dist.core``)
never imports from here. DeepSpeed is imported lazily, only for parameters DeepSpeed partitioned.
"""

from smt_dist.distributed.collectives import (
    all_finite,
    barrier,
    check_ranks_agree,
    is_distributed,
    rank,
    sum_across_ranks,
    world_size,
)

__all__ = [
    "all_finite",
    "barrier",
    "check_ranks_agree",
    "is_distributed",
    "rank",
    "sum_across_ranks",
    "world_size",
]
