"""Warm-up, selection and agreement, then conversion: what a job and a drop-in run before training.

``choose_blocks``: in a data-parallel job every rank warms up on its own micro-batches; the score
grids are summed across ranks (one small all-reduce), every rank selects, and a digest all-gather
proves that all ranks chose the same blocks before any of them converts its model.

``prepare`` is that plus ``apply_smt`` for a model someone else will train (the Trainer,
accelerate, a user's DeepSpeed loop), whatever engine: a model ZeRO-3 partitioned at load is warmed
up under DeepSpeed's own gathering (DeepSpeed is imported only then), any other model as it is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from smt_dist.core.config import SMTConfig
from smt_dist.core.selection import BlockSelection, select_blocks
from smt_dist.core.surgery import apply_smt, count_parameters, no_backward_below_blocks
from smt_dist.core.warmup import LossFn, collect_block_scores
from smt_dist.distributed import check_ranks_agree, sum_across_ranks
from smt_dist.files.jsonfile import read_json


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


def check_same_selection(selection: BlockSelection) -> None:
    """Raise on every rank unless all ranks selected exactly the same blocks (a collective call)."""
    check_ranks_agree({"the selected blocks (digest)": selection.digest()[:16]})


def prepare(
    model: torch.nn.Module,
    warmup_batches: Iterable[Any],
    smt_config: SMTConfig,
    *,
    config: dict[str, Any] | str | os.PathLike | None = None,
    loss_fn: Any = None,
    merge_on_save: bool = True,
) -> torch.nn.Module:
    """Warm up, select the blocks (checked identical on every rank) and convert the model.

    Call on every rank before ``initialize`` (or before the Trainer or accelerate builds its
    engine); returns the same model with only its blocks trainable. A model partitioned at load
    by ZeRO-3 is warmed up under DeepSpeed's own gathering; ``config`` is the DeepSpeed config, by
    default the one transformers loaded the model with (``HfDeepSpeedConfig``, which the Trainer
    and accelerate create).

    A ``config`` dict is changed in place (its ``"auto"`` ZeRO-3 sizes filled), so the engine built
    from it later sees the same sizes. ``merge_on_save`` keeps a pipeline's own saving right: the model's ``state_dict()`` and
    ``save_pretrained`` then write each trained weight as ``W + D`` under its usual name, which
    ``from_pretrained`` loads as the fine-tuned model (see ``smt_dist.integrations.merge_on_save``).
    Backward stops at the lowest selected block (``no_backward_below_blocks``).
    """
    from smt_dist.integrations.merge_on_save import save_merged

    selection = warm_up_and_choose(model, warmup_batches, smt_config, config=config, loss_fn=loss_fn)
    apply_smt(model, selection, smt_config)
    no_backward_below_blocks(model)  # where checkpointing was enabled before (the Trainer: its callback)
    if merge_on_save:
        save_merged(model)
    return model


def warm_up_and_choose(
    model: torch.nn.Module,
    warmup_batches: Iterable[Any],
    smt_config: SMTConfig,
    *,
    config: dict[str, Any] | str | os.PathLike | None = None,
    loss_fn: Any = None,
) -> BlockSelection:
    """``prepare`` without the conversion: the selection, the same on every rank (collective)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            "The model is already sharded by FSDP2; call prepare before fully_shard (or use "
            "launch/train.py --backend fsdp, which builds SMT layers before sharding)."
        )
    # A dict is filled in place: it may be the one the Trainer or accelerate will build the engine from.
    if isinstance(config, (str, os.PathLike)):
        ds_config = read_json(config, what="DeepSpeed config")
    else:
        ds_config = config if config is not None else (_transformers_config() or {})
    if isinstance(ds_config, dict) and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from smt_dist.engines.deepspeed import fill_zero3_sizes, warmup_engine

        fill_zero3_sizes(ds_config, model)
        warmup = warmup_engine(model, ds_config)
    else:
        warmup = contextlib.nullcontext()
    with warmup as after_backward:
        selection, _ = choose_blocks(
            model, warmup_batches, smt_config, loss_fn=loss_fn, after_backward=after_backward
        )
    return selection


def _transformers_config() -> dict[str, Any] | None:
    """The DeepSpeed config transformers loads models under (``HfDeepSpeedConfig``), if any."""
    from transformers.integrations.deepspeed import deepspeed_config

    return deepspeed_config()
