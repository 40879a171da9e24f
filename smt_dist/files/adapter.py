"""SMT adapters on disk: the trained blocks, their coordinates and a fingerprint of the base.

An adapter directory holds ``adapter_model.safetensors`` (per module ``<name>.blocks``
``[nb, l, l]`` and ``<name>.block_index`` ``[nb, 2]``, in ``SparseLinear``'s column-major order)
and ``smt_adapter.json`` (the SMT config, the modules and a fingerprint of the base weights).
Blocks are deltas from the base, so an adapter only makes sense on the base it was trained on; the
fingerprint makes loading it anywhere else a clear error rather than silent garbage.

The fingerprint holds 64 deterministic element samples per module, with the dtype they were read
in. Two bases match when their samples are equal after both are rounded to the coarser of the two
dtypes: a bf16 copy of an fp32 base matches it exactly, while a base changed by even 0.1% differs
in most samples. Adapter files are read as safetensors and JSON only, and every field is checked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from smt_dist.core.blocks import weight_shape
from smt_dist.core.config import SMTConfig
from smt_dist.core.layer import SparseLinear
from smt_dist.core.quantized import dequantized, error_bounds, float_dtype, quantization
from smt_dist.core.selection import BlockSelection
from smt_dist.core.surgery import apply_smt, selection_of, smt_modules
from smt_dist.distributed import rank
from smt_dist.distributed.params import full_value, read_elements
from smt_dist.files.atomic import atomic_directory, write_json
from smt_dist.files.base_checkpoint import SafetensorsCheckpoint
from smt_dist.files.dtypes import FLOAT_DTYPES, dtype_name
from smt_dist.files.jsonfile import read_json

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "smt_adapter.json"
FORMAT = "smt_dist.adapter/1"
_SAMPLES_PER_MODULE = 64


def base_fingerprint(model: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    """Shape, dtype and a few deterministic weight samples of each named base linear.

    Reads only the sampled elements, also from weights partitioned across ranks (then it is a
    collective call: every rank calls it with the same names).
    """
    prints = {}
    for name in names:
        layer = _base_layer(model, name)
        weight = layer.weight
        shape = weight_shape(weight)
        positions = _sample_positions(shape)
        kind = quantization(layer)
        # A quantized base: its dequantized values, each with how far the float base may lie.
        values = weight if kind is None else dequantized(layer)
        prints[name] = {
            "shape": list(shape),
            "dtype": dtype_name(float_dtype(layer)),
            "samples": read_elements(values, positions).tolist(),
        }
        if kind is not None:
            prints[name] |= {
                "quantized": kind,
                "error_bounds": error_bounds(layer, values, positions).tolist(),
            }
    return prints


def checkpoint_fingerprint(checkpoint: SafetensorsCheckpoint, names: list[str]) -> dict[str, dict[str, Any]]:
    """``base_fingerprint`` of a base read from its safetensors files (a few elements each)."""
    prints = {}
    for name in names:
        key = f"{name}.weight"
        if key not in checkpoint:
            raise ValueError(f"{checkpoint.directory} holds no weight '{key}'.")
        shape = torch.Size(checkpoint.shapes[key])
        samples = checkpoint.read_elements(key, _sample_positions(shape))
        prints[name] = {
            "shape": list(shape),
            "dtype": dtype_name(checkpoint.dtypes[key]),
            "samples": samples.tolist(),
        }
    return prints


def _sample_positions(shape: torch.Size) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(shape.numel(), (_SAMPLES_PER_MODULE,), generator=generator)


def save_smt_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    config: SMTConfig,
    fingerprint: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write the model's SMT blocks as an adapter directory, atomically. Returns the path.

    Call it on every rank when the blocks are partitioned (ZeRO-3, FSDP2): only the blocks are
    gathered, never the base, and rank 0 writes. ``fingerprint`` (from ``base_fingerprint``)
    spares reading the base weights again.
    """
    modules = smt_modules(model)
    selection = selection_of(model)
    tensors = {}
    for name, layer in modules.items():
        tensors[f"{name}.blocks"] = full_value(layer.blocks).contiguous()
        tensors[f"{name}.block_index"] = layer.block_index.detach().cpu().contiguous()
    fingerprint = fingerprint or base_fingerprint(model, sorted(modules))
    if rank() != 0:
        return Path(path)
    meta = {
        "format": FORMAT,
        "config": config.to_dict(),
        "block_size": selection.block_size,
        "num_blocks": selection.num_blocks,
        "modules": {name: {"num_blocks": layer.num_blocks} for name, layer in modules.items()},
        "base_fingerprint": fingerprint,
    }
    with atomic_directory(path) as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT})
        write_json(staging / CONFIG_NAME, meta)
    return Path(path)


def read_smt_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory: its metadata and its tensors.

    Every malformed field is a ``ValueError`` naming the file and the field; blocks that are not
    finite are refused.
    """
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"No SMT adapter at {path}: {file.name} is missing.")
    meta = read_json(config_file, what="SMT adapter config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not an smt_dist adapter config (format {FORMAT}).")
    _check_meta(meta, config_file)
    tensors = read_safetensors(weights_file)
    block_size = meta["block_size"]
    for name, entry in meta["modules"].items():
        blocks, index = tensors.get(f"{name}.blocks"), tensors.get(f"{name}.block_index")
        if blocks is None or index is None:
            raise ValueError(f"{weights_file} lacks the tensors of module '{name}'.")
        num_blocks = entry["num_blocks"]
        if tuple(blocks.shape) != (num_blocks, block_size, block_size) or tuple(index.shape) != (
            num_blocks,
            2,
        ):
            raise ValueError(
                f"{weights_file} has wrong shapes for '{name}': blocks {tuple(blocks.shape)} and "
                f"index {tuple(index.shape)}, expected ({num_blocks}, {block_size}, {block_size}) "
                f"and ({num_blocks}, 2)."
            )
        if index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(
                f"{weights_file}: the block_index of '{name}' must hold integers, not {index.dtype}."
            )
        if not blocks.is_floating_point():
            raise ValueError(
                f"{weights_file}: the blocks of '{name}' must be floating point, not {blocks.dtype}."
            )
        if not torch.isfinite(blocks).all():
            raise ValueError(f"{weights_file}: the blocks of '{name}' hold NaN or infinity.")
    return meta, tensors


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or foreign file is one ``ValueError``."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is truncated or not a safetensors file ({err}).") from err


def _check_meta(meta: dict[str, Any], file: Path) -> None:
    """Every field an adapter config needs, with the right type, or one sentence naming it."""

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"{file}: field '{field}' must be {want}, got {meta.get(field)!r:.80}.")

    block_size = meta.get("block_size")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise bad("block_size", "a positive integer")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise bad("modules", "an object mapping module names to {'num_blocks': n}")
    for name, entry in modules.items():
        count = entry.get("num_blocks") if isinstance(entry, dict) else None
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(
                f"{file}: modules['{name}'].num_blocks must be a positive integer, got {count!r}."
            )
    if not isinstance(meta.get("config"), dict):
        raise bad("config", "an object (the SMT config)")
    try:
        config = SMTConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{file}: field 'config' is not a valid SMT config ({err}).") from err
    if config.block_size != block_size:
        raise ValueError(
            f"{file}: config.block_size {config.block_size} differs from block_size {block_size}."
        )
    prints = meta.get("base_fingerprint")
    if not isinstance(prints, dict):
        raise bad("base_fingerprint", "an object")
    for name, entry in prints.items():
        if (
            name not in modules
            or not isinstance(entry, dict)
            or not isinstance(entry.get("shape"), list)
            or not isinstance(entry.get("samples"), list)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry["samples"])
            or entry.get("dtype", "float32") not in FLOAT_DTYPES
            or not _bounds_fit(entry)
        ):
            raise ValueError(f"{file}: base_fingerprint['{name}'] is malformed.")
    if prints and set(prints) != set(modules):
        raise ValueError(f"{file}: base_fingerprint does not cover every module of the adapter.")


def _bounds_fit(entry: dict) -> bool:
    """A quantized base's ``error_bounds``, where present: one finite number >= 0 per sample."""
    if "error_bounds" not in entry:
        return True
    bounds = entry["error_bounds"]
    return (
        isinstance(bounds, list)
        and len(bounds) == len(entry["samples"])
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in bounds
        )
    )


def load_smt_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Load an adapter onto its base model, in place, and return the model.

    A plain base model is converted with ``apply_smt`` first; a model that already has SMT layers
    must have the adapter's selection. Fails with a ``ValueError`` when the model is not the base
    the adapter was trained on (``check_base=False`` skips that check, and is the only way to load
    an adapter without a fingerprint), and with ``FileNotFoundError`` when files are missing.
    """
    meta, tensors = read_smt_adapter(path)
    names = sorted(meta["modules"])
    if check_base:
        if not meta["base_fingerprint"]:
            raise ValueError(
                f"The adapter at {path} has no base fingerprint, so nothing shows it belongs to this "
                "model; pass check_base=False to load it anyway."
            )
        _check_base(model, meta["base_fingerprint"], path)
    config = SMTConfig.from_dict(meta["config"])
    selection = BlockSelection(
        block_size=meta["block_size"], blocks={name: tensors[f"{name}.block_index"] for name in names}
    )
    if smt_modules(model):
        if selection_of(model).digest() != selection.digest():
            raise ValueError(f"The adapter at {path} selects other blocks than this SMT model has.")
    else:
        apply_smt(model, selection, config)
    modules = smt_modules(model)
    with torch.no_grad():
        for name in names:
            layer = modules[name]
            if not torch.equal(tensors[f"{name}.block_index"].to(torch.int64), layer.block_index.cpu()):
                raise ValueError(
                    f"The adapter at {path} stores the blocks of '{name}' in another order than "
                    "SparseLinear's (column-major); it was not written by save_smt_adapter."
                )
            layer.blocks.copy_(tensors[f"{name}.blocks"])
    return model


def _check_base(model: nn.Module, fingerprint: dict[str, Any], path: str | os.PathLike) -> None:
    names = sorted(fingerprint)
    for name in names:
        try:
            _base_layer(model, name)
        except ValueError as err:
            raise ValueError(f"The adapter at {path} targets '{name}': {err}") from err
    check_fingerprint(fingerprint, base_fingerprint(model, names), path)


def check_fingerprint(
    expected: dict[str, Any], found: dict[str, Any], path: str | os.PathLike, *, adapter: str | None = None
) -> None:
    """Raise ``ValueError`` unless a base's fingerprint matches the one the adapter recorded.

    Samples are compared exactly after rounding both sides to the coarser dtype of the two; a
    side read from a quantized base allows each sample its quantization's error bound, so a
    different model is told apart but a slightly changed one may pass. ``adapter`` names the
    adapter in the message (default: "The adapter at <path>").
    """
    who = adapter or f"The adapter at {path}"
    for name in sorted(expected):
        if found[name]["shape"] != expected[name]["shape"]:
            raise ValueError(
                f"{who} was trained on another base: '{name}' is "
                f"{tuple(found[name]['shape'])} here but {tuple(expected[name]['shape'])} in the adapter."
            )
        dtypes = [FLOAT_DTYPES[entry.get("dtype", "float32")] for entry in (expected[name], found[name])]
        coarse = max(dtypes, key=lambda d: torch.finfo(d).eps)
        a, b = (
            torch.tensor(entry["samples"], dtype=torch.float64).to(coarse)
            for entry in (expected[name], found[name])
        )
        slack = sum(
            torch.tensor(entry.get("error_bounds", [0.0] * len(a)), dtype=torch.float64)
            for entry in (expected[name], found[name])
        )
        if len(a) != len(b) or not bool(((a.double() - b.double()).abs() <= slack).all()):
            raise ValueError(
                f"{who} was trained on another base: the weights of '{name}' do not match its fingerprint."
            )


def _base_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"this model has no module '{name}'.") from err
    if hasattr(module, "get_base_layer"):  # a peft tuner layer wrapping the base linear
        module = module.get_base_layer()
    if not isinstance(module, (nn.Linear, SparseLinear)):
        raise ValueError(f"module '{name}' is a {type(module).__name__}, not a linear layer.")
    return module
