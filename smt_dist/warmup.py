"""The warm-up phase: score every block of every target over a few micro-batches.

Runs forward and backward with only the target weights requiring gradients, reduces each weight
gradient to block sums as soon as autograd produces it (see ``smt_dist.scoring``), and, in a
distributed job, sums those small grids over the data-parallel group so every rank ends with the
same scores. No optimizer exists and no dense gradient outlives its layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from smt_dist.config import SMTConfig
from smt_dist.distributed import sum_across_ranks
from smt_dist.model import find_targets
from smt_dist.scoring import BlockScoreCollector, finalize_scores

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def collect_block_scores(
    model: nn.Module,
    batches: Iterable[Any],
    config: SMTConfig,
    *,
    loss_fn: LossFn | None = None,
    group: Any = None,
) -> dict[str, torch.Tensor]:
    """Score every block of every target over ``config.warmup_steps`` micro-batches.

    Args:
        model: The model, not yet converted by ``apply_smt``.
        batches: Micro-batches; the first ``config.warmup_steps`` are used.
        config: Targets, block size, score type and warm-up length.
        loss_fn: ``loss_fn(model, batch) -> loss``. Default: ``model(**batch).loss`` for dict
            batches (Hugging Face causal LMs with ``labels``).
        group: Data-parallel process group whose ranks' scores are summed (default: world).

    Returns:
        Module name to an fp32 ``[out/l, in/l]`` score tensor, identical on every rank.
    """
    targets = find_targets(model, config)
    flags = {param: param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for linear in targets.values():
        linear.weight.requires_grad_(True)
    steps = 0
    try:
        with BlockScoreCollector(targets, block_size=config.block_size, score=config.score) as collector:
            for batch in batches:
                if steps == config.warmup_steps:
                    break
                _loss(model, batch, loss_fn).backward()
                steps += 1
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
    if steps < config.warmup_steps:
        raise ValueError(
            f"The warm-up needs {config.warmup_steps} micro-batches but the data gave only {steps}."
        )
    return finalize_scores(sum_across_ranks(collector.sums, group=group), config.score)


def _loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    if not isinstance(batch, dict):
        raise ValueError("Batches that are not dicts need a loss_fn(model, batch) -> loss.")
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError("The model returned no loss; put labels in the batch or pass loss_fn.")
    return loss
