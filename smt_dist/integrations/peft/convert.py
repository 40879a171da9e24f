"""Between peft's SMT adapters and smt_dist's own (``smt_adapter.json``), both ways.

    python -m smt_dist.integrations.peft.convert to-peft runs/smt/adapter runs/smt/peft-adapter
    python -m smt_dist.integrations.peft.convert to-smt  runs/smt/peft-adapter runs/smt/adapter2

Both hold the same blocks in the same order (``SparseLinear``'s column-major), the block
coordinates and the base fingerprint; only the file layout and the key names differ. peft's
adapter: ``adapter_config.json`` (``SMTPeftConfig``, the blocks' coordinates in
``block_pattern``) and ``adapter_model.safetensors`` with ``base_model.model.<module>.smt_blocks.
{blocks,block_index}``. Files are read as JSON and safetensors only and written atomically; the
source is checked whole before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from smt_dist.core.config import SMTConfig
from smt_dist.files.adapter import CONFIG_NAME, FORMAT, WEIGHTS_NAME, read_safetensors, read_smt_adapter
from smt_dist.files.atomic import atomic_directory, write_json
from smt_dist.files.jsonfile import read_json
from smt_dist.integrations.peft.config import PEFT_TYPE, SMTPeftConfig

PEFT_CONFIG_NAME = "adapter_config.json"
_PREFIX, _SUFFIX = "base_model.model.", ".smt_blocks."


def from_smt_adapter(
    source: str | os.PathLike, target: str | os.PathLike, *, base_model: str | None = None
) -> Path:
    """Write an smt_dist adapter directory as a peft SMT adapter; returns ``target``."""
    meta, tensors = read_smt_adapter(source)
    smt = SMTConfig.from_dict(meta["config"])
    config = SMTPeftConfig(
        **{
            name: getattr(smt, name)
            for name in ("block_size", "score", "num_blocks", "ratio", "warmup_steps")
        },
        target_modules=list(smt.target_modules),
        max_attention_fraction=smt.max_attention_fraction,
        max_mlp_fraction=smt.max_mlp_fraction,
        max_blocks_per_row=smt.max_blocks_per_row,
        block_pattern={name: tensors[f"{name}.block_index"].tolist() for name in sorted(meta["modules"])},
        base_fingerprint=meta["base_fingerprint"],
        base_model_name_or_path=base_model,
    )
    weights = {}
    for name in sorted(meta["modules"]):
        for kind in ("blocks", "block_index"):
            weights[f"{_PREFIX}{name}{_SUFFIX}{kind}"] = tensors[f"{name}.{kind}"].contiguous()
    with atomic_directory(target) as staging:
        config.save_pretrained(str(staging))
        save_file(weights, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(target)


def to_smt_adapter(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write a peft SMT adapter directory as an smt_dist adapter; returns ``target``."""
    source = Path(source)
    config_file, weights_file = source / PEFT_CONFIG_NAME, source / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"No peft adapter at {source}: {file.name} is missing.")
    data = read_json(config_file, what="peft adapter config")
    if not isinstance(data, dict) or data.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{config_file} is not a peft SMT adapter config (peft_type {PEFT_TYPE}).")
    try:
        config = SMTPeftConfig.from_peft_type(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_file} is not a valid SMT adapter config ({err}).") from err
    weights = read_safetensors(weights_file)
    selection = config.selection()
    tensors = {}
    for name, index in selection.blocks.items():
        blocks, stored = (
            weights.get(f"{_PREFIX}{name}{_SUFFIX}{kind}") for kind in ("blocks", "block_index")
        )
        if blocks is None:
            raise ValueError(f"{weights_file} lacks the blocks of module '{name}'.")
        if stored is not None and not torch.equal(stored.to(torch.int64), index):
            raise ValueError(
                f"{weights_file}: the block_index of '{name}' differs from {PEFT_CONFIG_NAME}'s."
            )
        tensors[f"{name}.blocks"] = blocks.contiguous()
        tensors[f"{name}.block_index"] = index.contiguous()
    meta = {
        "format": FORMAT,
        "config": config.smt_config().to_dict(),
        "block_size": config.block_size,
        "num_blocks": selection.num_blocks,
        "modules": {name: {"num_blocks": len(index)} for name, index in selection.blocks.items()},
        "base_fingerprint": config.base_fingerprint,
    }
    with atomic_directory(target) as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT})
        write_json(staging / CONFIG_NAME, meta)
    read_smt_adapter(target)  # what was written reads back as an adapter, every field checked
    return Path(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert SMT adapters between smt_dist's format and peft's.")
    parser.add_argument("direction", choices=("to-peft", "to-smt"))
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--base_model", default=None, help="to-peft: the base's path, recorded in the config")
    args = parser.parse_args(argv)
    if Path(args.target).resolve() == Path(args.source).resolve():
        parser.error("the target must be another directory than the source")
    try:
        if args.direction == "to-peft":
            from_smt_adapter(args.source, args.target, base_model=args.base_model)
        else:
            to_smt_adapter(args.source, args.target)
    except (ValueError, FileNotFoundError) as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
