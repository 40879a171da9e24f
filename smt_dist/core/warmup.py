"""The warm-up phase: score every block of every target over a few micro-batches.

Runs forward and backward with every parameter frozen; each target's block statistic is computed
inside its own backward (see ``smt_dist.core.scoring``), so no weight gradient and no optimizer state
ever exists, and the model may be partitioned by an engine that gathers each layer's weights for
its forward and backward. Summing across data-parallel ranks is the caller's ``reduce``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from smt_dist.core.config import SMTConfig
from smt_dist.core.scoring import BlockScoreProbes, finalize_scores
from smt_dist.core.surgery import find_targets

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Reduce = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def collect_block_scores(
    model: nn.Module,
    batches: Iterable[Any],
    config: SMTConfig,
    *,
    loss_fn: LossFn | None = None,
    reduce: Reduce | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Score every block of every target over ``config.warmup_steps`` micro-batches.

    Args:
        model: The model, not yet converted by ``apply_smt``; its weights may be partitioned.
        batches: Micro-batches; the first ``config.warmup_steps`` are used.
        config: Targets, block size, score type and warm-up length.
        loss_fn: ``loss_fn(model, batch) -> loss``. Default: ``model(**batch).loss`` for dict
            batches (Hugging Face causal LMs with ``labels``).
        reduce: Applied to the per-block sums before they become scores; in a data-parallel job,
            ``smt_dist.distributed.sum_across_ranks``, so every rank ends with the same scores.
        after_backward: Called after each micro-batch's backward (an engine's clean-up).

    Returns:
        Module name to an fp32 ``[out/l, in/l]`` score tensor on the CPU.
    """
    targets = find_targets(model, config)
    steps = 0
    with BlockScoreProbes(model, targets, block_size=config.block_size, score=config.score) as probes:
        for batch in batches:
            if steps == config.warmup_steps:
                break
            _loss(model, batch, loss_fn).backward()
            if after_backward is not None:
                after_backward()
            steps += 1
    if steps < config.warmup_steps:
        raise ValueError(
            f"The warm-up needs {config.warmup_steps} micro-batches but the data gave only {steps}."
        )
    sums = reduce(probes.sums) if reduce is not None else probes.sums
    scores = finalize_scores(sums, config.score, config.block_size)
    return {name: score.cpu() for name, score in scores.items()}


def _loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    if not isinstance(batch, dict):
        raise ValueError("Batches that are not dicts need a loss_fn(model, batch) -> loss.")
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError("The model returned no loss; put labels in the batch or pass loss_fn.")
    return loss
