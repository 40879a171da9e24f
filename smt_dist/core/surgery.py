"""Swapping SMT into a model and back out.

``find_targets`` picks the linears a config names; ``apply_smt`` replaces every target with at
least one selected block by a ``SparseLinear`` that reuses the target's own weight Parameter and
freezes everything else; ``merge_smt`` writes the trained blocks back into plain ``nn.Linear``
layers. Works on Hugging Face decoder models and on any ``nn.Module`` tree.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from smt_dist.core.blocks import block_grid, weight_shape
from smt_dist.core.config import SMTConfig, name_matches
from smt_dist.core.layer import SparseLinear
from smt_dist.core.quantized import keep_layout, quantization
from smt_dist.core.selection import BlockSelection


def find_targets(model: nn.Module, config: SMTConfig) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` whose name matches ``config.target_modules``, checked against the grid.

    Raises ``ValueError`` when nothing matches or when the block size does not divide a target.
    """
    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name_matches(name, config.target_modules)
    }
    if not targets:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        example = ", ".join(linears[:4]) or "none"
        raise ValueError(
            f"No nn.Linear matches target_modules {list(config.target_modules)}; "
            f"this model's linears include: {example}."
        )
    for name, linear in targets.items():
        block_grid(weight_shape(linear.weight), config.block_size, name=name)
    return targets


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a decoder: the longest ``nn.ModuleList`` named ``layers`` or ``h``."""
    candidates = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h")
    ]
    if not candidates:
        raise ValueError(
            "Found no decoder layers (an nn.ModuleList named 'layers' or 'h'); name the layers explicitly."
        )
    return list(max(candidates, key=len))


def count_parameters(model: nn.Module) -> int:
    """Total parameters, counting ZeRO-3 partitioned and 4-bit packed weights at their full size."""
    return sum(getattr(p, "ds_numel", weight_shape(p).numel()) for p in model.parameters())


def smt_modules(model: nn.Module) -> dict[str, SparseLinear]:
    """Every ``SparseLinear`` in the model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def apply_smt(
    model: nn.Module,
    selection: BlockSelection,
    config: SMTConfig,
    *,
    blocks_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Make the selected blocks the model's only trainable parameters, in place.

    Args:
        model: The model; its parameters are frozen and targets are swapped for ``SparseLinear``.
        selection: Blocks to train (from ``select_blocks`` or a loaded adapter).
        config: The SMT config (block size, and which modules share their input).
        blocks_dtype: dtype of the trainable blocks (default: each weight's dtype).

    Returns:
        The same model object.
    """
    if selection.block_size != config.block_size:
        raise ValueError(
            f"The selection uses block size {selection.block_size} but the config says {config.block_size}."
        )
    if smt_modules(model):
        raise ValueError("The model already has SparseLinear layers; apply SMT to a plain model.")
    keep_layout(model)  # 4-bit layers, selected or not, keep computing what they computed
    for param in model.parameters():
        param.requires_grad_(False)
    for name, index in selection.blocks.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"The selection names module '{name}', which this model lacks.") from err
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Module '{name}' is a {type(linear).__name__}, not an nn.Linear.")
        sparse = SparseLinear.from_linear(
            linear, index, block_size=config.block_size, blocks_dtype=blocks_dtype, name=name
        )
        _replace_module(model, name, sparse)
    share_inputs(model, config)
    return model


def share_inputs(model: nn.Module, config: SMTConfig) -> None:
    """Decide, per ``SparseLinear``, whether it keeps its whole input or a copy of its columns.

    The rule: siblings (one parent module, last name components in one group of
    ``config.shared_input_groups``) read the same input tensor. Copies of the column-blocks they
    read cost the sum of their column coverages times the input; keeping the input itself, by
    reference, costs it once whatever the number of readers. So when the coverages of the
    selected siblings sum to at least 1, every one of them keeps the input (once, between them);
    otherwise each keeps its copy. A module outside every group is its own group (it keeps the
    input only when its blocks read every column). Modules without selected blocks keep nothing.
    """
    groups: dict[tuple[str, object], list[SparseLinear]] = {}
    for name, module in smt_modules(model).items():
        parent, _, leaf = name.rpartition(".")
        group = next(
            (i for i, patterns in enumerate(config.shared_input_groups) if name_matches(leaf, patterns)), leaf
        )
        groups.setdefault((parent, group), []).append(module)
    for members in groups.values():
        keep_input = sum(m.column_coverage for m in members) >= 1
        for module in members:
            module.save_input = keep_input


def no_backward_below_blocks(model: nn.Module) -> bool:
    """Undo transformers' input-gradient hook, so backward stops at the lowest selected block.

    Since transformers 5, ``gradient_checkpointing_enable`` (and the Trainer's
    ``activation_checkpointing``) makes the embeddings' output require grad for every ``input_ids``
    model, for reentrant checkpointing and peft. SMT's blocks need none of it: with it, autograd
    runs the input-gradient backward of every decoder layer, those below the lowest selected block
    too. Non-reentrant checkpointing (transformers' default) gets the blocks' gradients without it,
    so the hook is removed; reentrant checkpointing needs it and keeps it. Returns whether a hook
    was removed.
    """
    hooks = getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None)
    if not hooks or any(_reentrant(module) for module in model.modules()):
        return False
    model.disable_input_require_grads()
    return True


def _reentrant(module: nn.Module) -> bool:
    """Whether a module checkpoints with ``use_reentrant=True`` (transformers' partial of checkpoint)."""
    if not getattr(module, "gradient_checkpointing", False):
        return False
    function = getattr(module, "_gradient_checkpointing_func", None)
    return getattr(function, "keywords", {}).get("use_reentrant", True) is not False


def merge_smt(
    model: nn.Module, *, full_value: Callable[[torch.Tensor], torch.Tensor | None] | None = None
) -> nn.Module:
    """Replace every ``SparseLinear`` by a frozen ``nn.Linear`` holding ``W + D``, in place.

    The merged weights are new tensors; the base weights are not written. Returns the model.
    Over a quantized base the merged layers hold dequantized ``W`` plus ``D`` (a warning says so).
    ``full_value(param)`` gives a partitioned parameter's whole value (``None`` for one that is
    whole already); ``smt_dist.merge_smt`` passes the gathering one, so this stays free of any
    engine.
    """
    modules = smt_modules(model)
    quantized = sorted({kind for m in modules.values() if (kind := quantization(m)) is not None})
    if quantized:
        warnings.warn(
            f"Merging SMT into a quantized base ({', '.join(quantized)}) gives dense float layers of "
            "dequantized W + D: what was trained, but not the original base plus D, and no longer "
            "quantized. For the original weights plus D, merge the adapter into the float "
            "checkpoint with python -m smt_dist.merge.",
            stacklevel=2,
        )
    for name, sparse in modules.items():
        own = {"weight": sparse.weight, "blocks": sparse.blocks, "bias": sparse.bias}
        full = {k: full_value(p) for k, p in own.items() if p is not None} if full_value else {}
        _replace_module(model, name, sparse.to_linear(**{k: v for k, v in full.items() if v is not None}))
    return model


def selection_of(model: nn.Module) -> BlockSelection:
    """The ``BlockSelection`` an SMT model trains."""
    modules = smt_modules(model)
    if not modules:
        raise ValueError("The model has no SparseLinear layers; run apply_smt first.")
    sizes = {m.block_size for m in modules.values()}
    if len(sizes) != 1:
        raise ValueError(f"SparseLinear layers use different block sizes: {sorted(sizes)}.")
    return BlockSelection(
        block_size=sizes.pop(),
        blocks={name: m.block_index.detach().cpu() for name, m in modules.items()},
    )


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
