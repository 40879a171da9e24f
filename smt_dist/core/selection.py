"""Global top-k selection of blocks from warm-up scores.

Every rank must train the same blocks, so selection is a deterministic function of the scores:
modules are visited in sorted-name order, blocks in row-major order, and a stable sort breaks ties
by that order. ``BlockSelection.digest`` lets the distributed code prove that ranks agree.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import torch

from smt_dist.core.blocks import sort_column_major
from smt_dist.core.config import SMTConfig, name_matches

GROUPS = ("attention", "mlp", "other")


@dataclass(frozen=True)
class BlockSelection:
    """Which blocks of which modules are trained."""

    block_size: int
    """Side ``l`` of every block."""

    blocks: dict[str, torch.Tensor]
    """Module name to ``[nb, 2]`` int64 (row-block, column-block), ``nb >= 1``; stored sorted
    column-major (by column-block, then row-block; ``SparseLinear``'s order) whatever order it was
    given in, so equal selections compare and hash equal."""

    def __post_init__(self) -> None:
        canonical = {}
        for name in sorted(self.blocks):
            index = torch.as_tensor(self.blocks[name]).to("cpu", torch.int64).reshape(-1, 2)
            canonical[name] = sort_column_major(index)
        object.__setattr__(self, "blocks", canonical)

    @property
    def num_blocks(self) -> int:
        """Total number of selected blocks."""
        return sum(len(index) for index in self.blocks.values())

    @property
    def num_parameters(self) -> int:
        """Trainable parameters the selection implies."""
        return self.num_blocks * self.block_size**2

    def digest(self) -> str:
        """A hash of the whole selection; equal on every rank when ranks agree."""
        h = hashlib.sha256(str(self.block_size).encode())
        for name in sorted(self.blocks):
            h.update(name.encode())
            h.update(self.blocks[name].contiguous().numpy().tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form that :meth:`from_dict` reads back into an equal selection."""
        return {
            "block_size": self.block_size,
            "blocks": {name: index.tolist() for name, index in self.blocks.items()},
            "digest": self.digest(),
        }

    @classmethod
    def from_dict(cls, data: object, *, source: str) -> BlockSelection:
        """Read :meth:`to_dict` output; every malformed field is a ``ValueError`` naming ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object with block_size and blocks.")
        block_size, blocks = data.get("block_size"), data.get("blocks")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{source}: block_size must be a positive integer, got {block_size!r}.")
        if not isinstance(blocks, dict) or not blocks:
            raise ValueError(f"{source}: blocks must map module names to lists of [row, column] pairs.")
        parsed = {}
        for name, index in blocks.items():
            if (
                not isinstance(index, list)
                or not index
                or not all(
                    isinstance(pair, list)
                    and len(pair) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair)
                    for pair in index
                )
            ):
                raise ValueError(
                    f"{source}: blocks of '{name}' must be a non-empty list of [row, column] pairs of "
                    "non-negative integers."
                )
            parsed[name] = torch.tensor(index, dtype=torch.int64)
        selection = cls(block_size=block_size, blocks=parsed)
        if "digest" in data and data["digest"] != selection.digest():
            raise ValueError(f"{source}: the digest does not match its blocks; the file was altered.")
        return selection

    def summary(self, config: SMTConfig) -> dict[str, dict[str, int]]:
        """Block counts per module type (last name component), per layer and per group."""
        by_type: Counter[str] = Counter()
        by_layer: Counter[str] = Counter()
        by_group: Counter[str] = Counter()
        for name, index in self.blocks.items():
            by_type[name.rsplit(".", 1)[-1]] += len(index)
            layer = re.search(r"\.(\d+)\.", f".{name}.")
            by_layer[layer.group(1) if layer else "-"] += len(index)
            by_group[group_of(name, config)] += len(index)
        return {
            "by_type": dict(sorted(by_type.items())),
            "by_layer": dict(sorted(by_layer.items(), key=lambda kv: (len(kv[0]), kv[0]))),
            "by_group": dict(sorted(by_group.items())),
        }


def group_of(name: str, config: SMTConfig) -> str:
    """``attention``, ``mlp`` or ``other``, by the config's group patterns."""
    if name_matches(name, config.attention_modules):
        return "attention"
    if name_matches(name, config.mlp_modules):
        return "mlp"
    return "other"


def budget_in_blocks(config: SMTConfig, *, total_params: int | None) -> int:
    """The budget as a block count: ``num_blocks``, or ``ratio`` of ``total_params`` in blocks."""
    if config.num_blocks is not None:
        return config.num_blocks
    if total_params is None:
        raise ValueError("A ratio budget needs the model's total parameter count (total_params).")
    block_params = config.block_size**2
    count = int(config.ratio * total_params // block_params)
    if count < 1:
        raise ValueError(
            f"ratio={config.ratio} of {total_params} parameters is less than one block of "
            f"{config.block_size}x{config.block_size}={block_params} parameters; raise the ratio "
            "or lower the block size."
        )
    return count


def check_budget_fits(budget: int, *, available: int, modules: int) -> None:
    """Raise ``ValueError`` when a budget asks for more blocks than the targets have."""
    if budget > available:
        raise ValueError(
            f"The budget of {budget} blocks exceeds the {available} blocks of the {modules} target "
            "modules; lower num_blocks/ratio or target more modules."
        )


def select_blocks(
    scores: dict[str, torch.Tensor], config: SMTConfig, *, total_params: int | None = None
) -> BlockSelection:
    """Keep the top-k blocks over all targets, honouring the optional group caps.

    Args:
        scores: Module name to ``[out/l, in/l]`` block scores (from ``collect_block_scores``).
        config: Budget, block size and caps.
        total_params: The model's total parameter count; required when the budget is a ratio.
    """
    if not scores:
        raise ValueError("No block scores to select from: no target module matched.")
    budget = budget_in_blocks(config, total_params=total_params)
    names = sorted(scores)
    flat_scores = []
    for name in names:
        score = scores[name].detach().float().cpu()
        if score.ndim != 2:
            raise ValueError(f"Scores for '{name}' must be 2-D [out/l, in/l], got {tuple(score.shape)}.")
        if not torch.isfinite(score).all():
            raise ValueError(f"Scores for '{name}' contain NaN or infinity; check the warm-up loss.")
        flat_scores.append(score.flatten())
    flat = torch.cat(flat_scores)
    check_budget_fits(budget, available=flat.numel(), modules=len(names))
    order = torch.sort(flat, descending=True, stable=True).indices
    order = _apply_caps(order, names, [s.numel() for s in flat_scores], budget, config)
    if config.max_blocks_per_row is not None:
        order = _cap_rows(order, [scores[name].shape for name in names], budget, config.max_blocks_per_row)

    chosen = torch.sort(order[:budget]).values
    offsets = torch.tensor([0] + [s.numel() for s in flat_scores]).cumsum(0)
    blocks = {}
    for i, name in enumerate(names):
        inside = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
        if len(inside):
            n_cols = scores[name].shape[1]
            blocks[name] = torch.stack([inside // n_cols, inside % n_cols], dim=1)
    return BlockSelection(block_size=config.block_size, blocks=blocks)


def _apply_caps(
    order: torch.Tensor, names: list[str], sizes: list[int], budget: int, config: SMTConfig
) -> torch.Tensor:
    """Drop, in rank order, the blocks that would push a capped group past its cap."""
    caps = {"attention": config.max_attention_fraction, "mlp": config.max_mlp_fraction}
    if all(cap is None for cap in caps.values()):
        return order
    groups = [GROUPS.index(group_of(name, config)) for name in names]
    group_ids = torch.repeat_interleave(torch.tensor(groups), torch.tensor(sizes))[order]
    allowed = torch.ones_like(order, dtype=torch.bool)
    for group, cap in caps.items():
        if cap is None:
            continue
        in_group = group_ids == GROUPS.index(group)
        # + 1e-9: a cap written as a / budget must allow a blocks, whatever the float rounding
        allowed &= ~in_group | (in_group.cumsum(0) <= int(cap * budget + 1e-9))
    kept = order[allowed]
    if len(kept) < budget:
        raise ValueError(
            f"The caps (attention {caps['attention']}, mlp {caps['mlp']}) leave only {len(kept)} "
            f"eligible blocks for a budget of {budget}; loosen a cap or lower the budget."
        )
    return kept


def _cap_rows(order: torch.Tensor, grids: list[torch.Size], budget: int, cap: int) -> torch.Tensor:
    """Drop, in rank order, every block past the ``cap``-th of its (module, row-block)."""
    row_of = torch.cat(
        [torch.arange(rows).repeat_interleave(cols) for rows, cols in grids]
    ) + torch.repeat_interleave(
        torch.tensor([0] + [rows for rows, _ in grids[:-1]]).cumsum(0),
        torch.tensor([r * c for r, c in grids]),
    )
    rows = row_of[order]  # each candidate's (module, row-block), in rank order
    grouped = torch.sort(rows, stable=True).indices  # by row, rank order kept inside each row
    counts = torch.bincount(rows[grouped])
    starts = counts.cumsum(0) - counts
    rank_in_row = torch.empty_like(order)
    rank_in_row[grouped] = torch.arange(len(order)) - starts[rows[grouped]]
    kept = order[rank_in_row < cap]
    if len(kept) < budget:
        raise ValueError(
            f"max_blocks_per_row={cap} leaves only {len(kept)} eligible blocks for a budget of {budget}; "
            "raise the cap or lower the budget."
        )
    return kept
