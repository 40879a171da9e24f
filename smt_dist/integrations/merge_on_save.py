"""Saving code written for plain models keeps SMT's training: weights are written as ``W + D``.

A pipeline saves the way it always has (``save_pretrained``, ``Trainer.save_model``, a walk over
``state_dict()``), and every one of those would write the untouched base ``weight`` of a
``SparseLinear`` next to ``blocks`` and ``block_index`` keys that ``from_pretrained`` ignores:
the fine-tuning silently lost. ``save_merged(model)`` (which ``smt_dist.integrations.prepare.prepare``
applies) closes that:

- each ``SparseLinear``'s ``state_dict()`` gives its ``weight`` as ``W + D`` (under the same name,
  marked by a flag key), so ``from_pretrained`` loads the fine-tuned model; loading such a state
  dict back into the SMT model takes the blocks out of the weight again, so a resume is exact;
- ``model.save_pretrained`` writes a plain Hugging Face checkpoint: merged weights and none of
  SMT's own keys. A state dict passed to it (the Trainer and accelerate pass one they gathered
  from ZeRO-3 partitions, walking parameters rather than ``state_dict()``) is merged first;
  without one, on a model whose parameters are partitioned, it refuses rather than writing empty
  partitions.

A ``state_dict()`` walk keeps the blocks and their index beside the merged weights, so such a
dict loads back into the SMT model exactly. ``save_smt_adapter`` and the streaming merge
(``python -m smt_dist.merge``) remain the way to save just the adapter.

``merge_smt`` is the in-memory merge for any engine: it gathers what is partitioned and hands the
whole values to the pure merge of ``smt_dist.core.surgery``.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from smt_dist.core import surgery
from smt_dist.core.blocks import weight_shape
from smt_dist.core.layer import MERGED_FLAG, SparseLinear, merge_blocks_into
from smt_dist.core.surgery import smt_modules
from smt_dist.distributed.params import full_value, is_partitioned


def merge_smt(model: nn.Module) -> nn.Module:
    """Replace every ``SparseLinear`` by a frozen ``nn.Linear`` holding ``W + D``, in place.

    The merged weights are new tensors; the base weights are not written. Returns the model.
    Partitioned parameters (ZeRO-3, FSDP2) are gathered one module at a time, on every rank (a
    collective call), and each rank gets the whole merged model on the CPU; for a model larger
    than a rank, merge the saved adapter with ``python -m smt_dist.merge`` instead.
    """
    return surgery.merge_smt(model, full_value=lambda p: full_value(p) if is_partitioned(p) else None)


def save_merged(model: nn.Module) -> nn.Module:
    """Make the model's own saving write merged weights (in place); returns the model."""
    modules = smt_modules(model)
    if not modules:
        raise ValueError("The model has no SparseLinear layers; apply SMT first.")
    for module in modules.values():
        module.merge_on_save = True
    save = getattr(model, "save_pretrained", None)
    if save is not None and not getattr(save, "_smt_merges", False):
        model.save_pretrained = _merging(model, save)
    return model


def merge_state_dict(state_dict: dict[str, Any], modules: dict[str, SparseLinear]) -> dict[str, Any]:
    """A copy of ``state_dict`` whose SMT weights are ``W + D`` (those not merged already)."""
    merged = dict(state_dict)
    for name, module in modules.items():
        merge_blocks_into(merged, f"{name}.", weight_shape(module.weight))
    return merged


def _merging(model: nn.Module, save):
    @functools.wraps(save)
    def save_pretrained(save_directory, *args, state_dict=None, **kwargs):
        if not kwargs.get("is_main_process", True):  # this rank writes no weights
            return save(save_directory, *args, state_dict=state_dict, **kwargs)
        modules = smt_modules(model)
        if state_dict is None:
            if any(is_partitioned(m.weight) for m in modules.values()):
                raise ValueError(
                    "The model's weights are partitioned (ZeRO-3 or FSDP): pass the gathered state dict, "
                    "e.g. save_pretrained(dir, state_dict=accelerator.get_state_dict(engine)) or "
                    "engine._zero3_consolidated_16bit_state_dict() (the Trainer does it itself), or use "
                    "smt_dist.save_smt_adapter and python -m smt_dist.merge."
                )
            state_dict = model.state_dict()  # merged by each SparseLinear's state-dict hook
        else:
            state_dict = merge_state_dict(state_dict, modules)
        own = {f"{name}.{key}" for name in modules for key in ("blocks", "block_index", MERGED_FLAG)}
        plain = {key: value for key, value in state_dict.items() if key not in own}
        return save(save_directory, *args, state_dict=plain, **kwargs)

    save_pretrained._smt_merges = True
    return save_pretrained
