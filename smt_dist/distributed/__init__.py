"""Everything that talks to ``torch.distributed``.

The method itself (layer, scoring, selection, model surgery, the AdamW update) never imports
from here; the warm-up pipeline, adapters, backends and the job use these helpers.
"""

from smt_dist.distributed.collectives import (
    all_finite,
    check_ranks_agree,
    check_same_selection,
    is_distributed,
    sum_across_ranks,
)

__all__ = ["all_finite", "check_ranks_agree", "check_same_selection", "is_distributed", "sum_across_ranks"]
