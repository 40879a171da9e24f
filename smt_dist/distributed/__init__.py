"""Everything that talks to ``torch.distributed``; model code never imports from here."""

from smt_dist.distributed.collectives import (
    check_same_selection,
    is_distributed,
    sum_across_ranks,
)

__all__ = ["check_same_selection", "is_distributed", "sum_across_ranks"]
