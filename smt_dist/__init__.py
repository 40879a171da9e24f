"""Sparse Matrix Tuning (SMT) for distributed training with DeepSpeed, FSDP2 and torchrun.

SMT (He et al., ICLR 2025) fine-tunes a model by training only the ``l x l`` weight blocks whose
gradients were largest during a short warm-up. The public names are re-exported here.

The layers, each importing only those below it: ``core`` (the method, torch only), ``optim``,
``distributed`` (collectives and partitioned parameters), ``files``, ``engines`` (one file per
engine behind the ``Backend`` seam), ``integrations`` (drop-ins for other people's training code)
and ``recipes`` (the jobs).
"""

from smt_dist.core.quantized import quiet_optional_kernels

quiet_optional_kernels()  # before anything below imports transformers or peft

from smt_dist.core.config import SMTConfig
from smt_dist.core.layer import SparseLinear
from smt_dist.core.selection import BlockSelection, select_blocks
from smt_dist.core.surgery import apply_smt, count_parameters, find_targets, no_backward_below_blocks
from smt_dist.core.warmup import collect_block_scores
from smt_dist.files.adapter import load_smt_adapter, save_smt_adapter
from smt_dist.integrations.merge_on_save import merge_smt
from smt_dist.integrations.prepare import choose_blocks
from smt_dist.optim import BlockShardedAdamW

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
    "no_backward_below_blocks",
    "save_smt_adapter",
    "select_blocks",
]
