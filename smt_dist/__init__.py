"""Sparse Matrix Tuning (SMT) for distributed training with DeepSpeed, FSDP2 and torchrun.

SMT (He et al., ICLR 2025) fine-tunes a model by training only the ``l x l`` weight blocks whose
gradients were largest during a short warm-up. The public names are re-exported here.
"""

from smt_dist.adapter import load_smt_adapter, save_smt_adapter
from smt_dist.config import SMTConfig
from smt_dist.layer import SparseLinear
from smt_dist.model import apply_smt, count_parameters, find_targets, merge_smt
from smt_dist.optim import BlockShardedAdamW
from smt_dist.pipeline import choose_blocks
from smt_dist.selection import BlockSelection, select_blocks
from smt_dist.warmup import collect_block_scores

__version__ = "0.1.0"

__all__ = [
    "BlockSelection",
    "BlockShardedAdamW",
    "SMTConfig",
    "SparseLinear",
    "apply_smt",
    "choose_blocks",
    "collect_block_scores",
    "count_parameters",
    "find_targets",
    "load_smt_adapter",
    "merge_smt",
    "save_smt_adapter",
    "select_blocks",
]
