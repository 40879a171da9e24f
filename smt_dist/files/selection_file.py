"""``selection.json``: the blocks a run trains, written by the job and read back by ``--smt_selection``.

The file holds the selection (``BlockSelection.to_dict``), its digest and a summary (blocks per
module type, layer and group; trainable count and percent); ``block_scores.safetensors`` beside it
holds the warm-up's score grids. A run's adapter holds its selection too (``adapter_selection``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from smt_dist.core.blocks import weight_shape
from smt_dist.core.config import SMTConfig
from smt_dist.core.layer import SparseLinear
from smt_dist.core.selection import BlockSelection
from smt_dist.files.adapter import read_smt_adapter
from smt_dist.files.atomic import write_json
from smt_dist.files.jsonfile import read_json

SELECTION_FORMAT = "smt_dist.selection/1"


def read_selection(path: Path, model: torch.nn.Module, config: SMTConfig) -> BlockSelection:
    """``--smt_selection``: a selection.json from an earlier run, checked against this model and config."""
    data = read_json(path, what="Selection file")
    if not isinstance(data, dict) or data.get("format") != SELECTION_FORMAT:
        raise ValueError(f"{path} is not a selection file written by this job (format {SELECTION_FORMAT}).")
    selection = BlockSelection.from_dict(data, source=str(path))
    if selection.block_size != config.block_size:
        raise ValueError(
            f"{path} selects blocks of size {selection.block_size} but --smt_block_size is {config.block_size}."
        )
    for name, index in selection.blocks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{path} names module '{name}', which this model lacks.") from err
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{path} names module '{name}', which is not an nn.Linear.")
        SparseLinear.check_index(index, weight_shape(module.weight), config.block_size, name=name)
    return selection


def write_selection(
    output_dir: Path, selection: BlockSelection, scores: dict | None, config: SMTConfig, total_params: int
) -> None:
    """``selection.json`` (blocks, digest, summary; ``--smt_selection`` reads it) and the warm-up's scores."""
    summary = selection.summary(config)
    total = selection.num_blocks
    summary["num_blocks"] = total
    summary["trainable_parameters"] = selection.num_parameters
    summary["trainable_percent"] = round(100 * selection.num_parameters / total_params, 4)
    summary["share_by_type"] = {name: round(count / total, 4) for name, count in summary["by_type"].items()}
    summary["modules"] = {name: len(index) for name, index in selection.blocks.items()}
    data = {"format": SELECTION_FORMAT, "score": config.score, **selection.to_dict(), "summary": summary}
    write_json(output_dir / "selection.json", data)
    scores_file = output_dir / "block_scores.safetensors"
    if scores is not None:
        save_file({name: score.contiguous() for name, score in scores.items()}, str(scores_file))
    else:  # an overwritten run's scores would describe other blocks
        scores_file.unlink(missing_ok=True)


def adapter_selection(adapter_dir: Path) -> BlockSelection:
    """The blocks an adapter (of a checkpoint) trains."""
    meta, tensors = read_smt_adapter(adapter_dir)
    return BlockSelection(
        block_size=meta["block_size"],
        blocks={name: tensors[f"{name}.block_index"] for name in meta["modules"]},
    )
