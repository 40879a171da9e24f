"""Merge an SMT adapter into its base checkpoint, streaming one safetensors shard at a time.

    python -m smt_dist.merge --base /models/llama-70b --adapter runs/smt/adapter --output merged/

The result is a Hugging Face checkpoint (the base's shard layout and index, its config and
tokenizer files) that ``from_pretrained`` loads as the fine-tuned model. The base is never built
as a model: each shard is read, the blocks of the modules it holds are added to their weights,
and it is written before the next one is read, so memory stays at one shard whatever the model's
size. The adapter must have been trained on this base (its fingerprint is checked against the
files first), and the output directory appears only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from smt_dist.core.blocks import scatter_blocks
from smt_dist.files.adapter import check_fingerprint, checkpoint_fingerprint, read_smt_adapter
from smt_dist.files.atomic import atomic_directory, write_json
from smt_dist.files.base_checkpoint import INDEX_NAME, SafetensorsCheckpoint
from smt_dist.files.dtypes import FLOAT_DTYPES

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def merge_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``base`` with ``adapter``'s blocks added as a checkpoint at ``output``; returns it.

    Args:
        base: The base model's directory (config and safetensors weights).
        adapter: An SMT adapter directory trained on that base.
        output: Where the merged checkpoint goes; replaced atomically if it exists.
        dtype: dtype of every floating tensor written (default: each tensor's own, so a bf16
            base stays bf16; blocks are added in that dtype either way).
    """
    base, output = Path(base), Path(output)
    checkpoint = SafetensorsCheckpoint(base)
    meta, tensors = read_smt_adapter(adapter)
    names = sorted(meta["modules"])
    check_fingerprint(meta["base_fingerprint"], checkpoint_fingerprint(checkpoint, names), adapter)
    blocks = {f"{name}.weight": (tensors[f"{name}.block_index"], tensors[f"{name}.blocks"]) for name in names}
    with atomic_directory(output) as staging:
        for file in checkpoint.files:
            _merge_shard(checkpoint, file, staging / file, blocks, dtype)
        if (base / INDEX_NAME).is_file():
            index = json.loads((base / INDEX_NAME).read_text())
            index["metadata"] = {"total_size": sum((staging / f).stat().st_size for f in checkpoint.files)}
            write_json(staging / INDEX_NAME, index)
        for extra in sorted(base.iterdir()):
            if extra.is_file() and extra.name != INDEX_NAME and not extra.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(extra, staging / extra.name)
        if dtype is not None and (staging / "config.json").is_file():
            config = json.loads((staging / "config.json").read_text())
            key = "torch_dtype" if "torch_dtype" in config else "dtype"
            config[key] = str(dtype).removeprefix("torch.")
            write_json(staging / "config.json", config)
    return output


def _merge_shard(
    checkpoint: SafetensorsCheckpoint,
    file: str,
    destination: Path,
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype | None,
) -> None:
    """Read one shard, add the blocks of the weights it holds, write it; nothing outlives the call."""
    shard = checkpoint.shard_tensors(file)
    for key in list(shard):
        tensor = shard[key]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if key in blocks:
            index, values = blocks[key]
            tensor = scatter_blocks(tensor, index, values, add=True)
        shard[key] = tensor.contiguous()
    save_file(shard, str(destination), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smt_dist.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="The base model directory (safetensors).")
    parser.add_argument("--adapter", required=True, help="The SMT adapter directory.")
    parser.add_argument("--output", required=True, help="Where the merged checkpoint goes.")
    parser.add_argument(
        "--dtype",
        choices=["auto", *FLOAT_DTYPES],
        default="auto",
        help="dtype of the written weights (auto: the base's).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    try:
        for label, source in (("base", args.base), ("adapter", args.adapter)):
            source = Path(source).resolve()
            if output == source or source in output.parents or output in source.parents:
                raise ValueError(f"--output {args.output} overlaps the {label} directory {source}.")
        if output.exists() and any(output.iterdir()) and not args.overwrite:
            raise ValueError(f"{args.output} exists and is not empty; pass --overwrite to replace it.")
        merge_checkpoint(args.base, args.adapter, output, dtype=FLOAT_DTYPES.get(args.dtype))
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"smt_dist.merge: error: {err}", file=sys.stderr)
        return 1
    print(f"merged checkpoint written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
