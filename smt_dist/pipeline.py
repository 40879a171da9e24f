"""Warm-up, selection and agreement in one call: what a job and a drop-in both run before training.

In a data-parallel job every rank warms up on its own micro-batches; the score grids are summed
across ranks (one small all-reduce), every rank selects, and a digest all-gather proves that all
ranks chose the same blocks before any of them converts its model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from smt_dist.config import SMTConfig
from smt_dist.distributed import check_same_selection, sum_across_ranks
from smt_dist.model import count_parameters
from smt_dist.selection import BlockSelection, select_blocks
from smt_dist.warmup import LossFn, collect_block_scores


def choose_blocks(
    model: nn.Module,
    batches: Iterable[Any],
    config: SMTConfig,
    *,
    loss_fn: LossFn | None = None,
    after_backward: Callable[[], None] | None = None,
) -> tuple[BlockSelection, dict[str, torch.Tensor]]:
    """Warm up on this rank's batches, select from the scores summed over ranks, check agreement.

    Call on every rank of the data-parallel group (it is a collective call when
    ``torch.distributed`` is initialised). Returns the selection and the scores it came from.
    """
    scores = collect_block_scores(
        model, batches, config, loss_fn=loss_fn, reduce=sum_across_ranks, after_backward=after_backward
    )
    selection = select_blocks(scores, config, total_params=count_parameters(model))
    check_same_selection(selection)
    return selection, scores
