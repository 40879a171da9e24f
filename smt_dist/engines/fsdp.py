"""The FSDP2 engine: a model built sharded (one unit per decoder layer), blocks whole, and the job's backend.

FSDP2 shards every parameter on dim 0. For a block parameter ``[nb, l, l]`` dim 0 counts blocks,
so each rank holds whole blocks; frozen weights are sharded by rows and never get gradients, so
FSDP reduce-scatters only the blocks' gradients. ``SparseLinear`` saves its weight Parameter for
backward and never writes it, which is what FSDP's free-and-refill of unsharded storage needs.

No rank ever holds the whole model. ``load_sharded`` builds the model on the meta device, shards
it, gives it storage for this rank's rows only, and each rank reads exactly those rows from the
safetensors files. Every rank reading its own slice (rather than rank 0 reading everything and
broadcasting, as torchtune does) keeps rank 0's memory at one slice too and needs no broadcast;
it assumes the checkpoint is on a filesystem every node can read, as checkpoints here do anyway.
The warm-up runs on that sharded model, FSDP gathering each layer for its forward and backward.
FSDP2 cannot add parameters to a sharded model, so ``FsdpBackend.build`` drops the warm-up model
and builds the training model the same way with the SMT layers already in place.

Checkpoints go through torch.distributed.checkpoint, read without running code a checkpoint file
could plant: DCP's file reader unpickles ``.metadata`` with plain ``pickle`` and its default planner
reads non-tensor items with ``torch.load(weights_only=False)``. ``SafeFileSystemReader`` reads the
metadata with an unpickler that builds only DCP's own metadata types, ``SafeLoadPlanner`` reads
non-tensor items with ``weights_only=True``; anything else is a ``ValueError`` naming the item.
"""

from __future__ import annotations

import gc
import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from smt_dist.core.layer import SparseLinear
from smt_dist.core.selection import BlockSelection
from smt_dist.core.surgery import apply_smt, decoder_layers
from smt_dist.distributed.params import local_rows
from smt_dist.engines.base import LoopBackend
from smt_dist.files.base_checkpoint import SafetensorsCheckpoint


class FsdpBackend(LoopBackend):
    """FSDP2 units per decoder layer; torch AdamW on the sharded (DTensor) blocks."""

    name = "fsdp"
    last_grad_norm: float | None = None  # set by clip()
    loads_in_build = True
    quantized_base = (
        "cannot be sharded by FSDP2, which reads the base's float weights shard by shard; use "
        "--backend torch or DeepSpeed ZeRO-2, where each rank holds the whole quantized base."
    )

    def checkpoint_layout(self) -> dict:
        """Any world size: torch.distributed.checkpoint reshards the blocks and their state."""
        return {"backend": self.name}

    def load_base(self) -> None:
        self.module = self._load(prepare=self.configure_model)

    def build(self, selection: BlockSelection, *, lr_lambda) -> None:
        self.module = None
        gc.collect()  # the warm-up model's shards go before the training model's arrive

        def prepare(model: torch.nn.Module) -> None:
            apply_smt(model, selection, self.smt_config)
            self.configure_model(model)

        self.module = self._load(prepare=prepare)
        optimizer = torch.optim.AdamW(
            self.blocks, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        self.start_loop(optimizer, lr_lambda)

    def _load(self, *, prepare) -> torch.nn.Module:
        return load_sharded(
            self.args.model_dir,
            dtype=self.dtype,
            device=self.device,
            cpu_offload=self.args.fsdp_cpu_offload,
            prepare=prepare,
        )

    def clip(self) -> None:
        if self.args.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.blocks, self.args.max_grad_norm)  # over DTensors
            self.last_grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()

    def grad_norm(self) -> float | None:
        return self.last_grad_norm

    def _states(self):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=True)
        return {
            "model": get_model_state_dict(self.module, options=options),
            "optim": get_optimizer_state_dict(self.module, self.optimizer, options=options),
        }

    def save(self, directory: Path) -> None:
        """Sharded blocks and optimizer state through torch.distributed.checkpoint (collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._states(), checkpoint_id=str(directory / "fsdp"))
        self.save_schedule(directory)

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = directory / "fsdp"
        if not path.is_dir():
            raise FileNotFoundError(f"{directory} holds no FSDP state: was it written by --backend fsdp?")
        metadata = SafeFileSystemReader(str(path)).read_metadata()  # refuses unsafe metadata in one sentence
        states = self._states()
        # DCP logs each rank's failure with a traceback before raising them together; the
        # sentence below says what failed.
        dcp_logger = logging.getLogger("torch.distributed.checkpoint")
        level = dcp_logger.level
        dcp_logger.setLevel(logging.CRITICAL)
        try:
            dcp.load(states, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(path))
        except CheckpointException as err:  # DCP gathers every rank's failure into one exception
            short = _short_files(path, metadata)
            if short:
                raise ValueError(
                    f"{short[0]} is shorter than its checkpoint metadata says (truncated or replaced); "
                    "the FSDP state cannot be read."
                ) from err
            raise ValueError(f"The FSDP state in {path} cannot be read: {_first_failure(err)}") from err
        finally:
            dcp_logger.setLevel(level)
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.module, states["model"], options=options)
        set_optimizer_state_dict(self.module, self.optimizer, states["optim"], options=options)
        self.load_schedule(directory)


def _short_files(path: Path, metadata: Metadata) -> list[Path]:
    """The ``.distcp`` files that end before an item the metadata places in them."""
    ends: dict[str, int] = {}
    for stored in (metadata.storage_data or {}).values():
        ends[stored.relative_path] = max(ends.get(stored.relative_path, 0), stored.offset + stored.length)
    return [
        path / name
        for name, end in sorted(ends.items())
        if not (path / name).is_file() or (path / name).stat().st_size < end
    ]


def _first_failure(err: Exception) -> str:
    """The most telling line of a DCP failure: ours (a ValueError) where there is one."""
    failures = list(getattr(err, "failures", {}).values()) or [err]
    first = failures[0][0] if isinstance(failures[0], tuple) else failures[0]  # (exception, stack)
    text = str(first).strip()
    for line in text.replace("; ", "\n").splitlines():
        if "is not checkpoint metadata" in line or "refusing to load" in line:
            return line.split("read failed: ")[-1].strip()
    detail = text.splitlines()[-1][:300] if text else "the files are truncated or damaged"
    return f"{type(first).__name__}: {detail}."


# ---- building and loading sharded --------------------------------------------------------------


def shard_model(
    model: nn.Module,
    *,
    layers: list[nn.Module] | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer, then to the root, in place; returns the model.

    Args:
        model: The model (plain or after ``apply_smt``), on its training device or the meta device.
        layers: The modules that each become an FSDP unit (default: ``decoder_layers(model)``).
        cpu_offload: Keep sharded parameters (frozen weights included) in host memory.
    """
    kwargs = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if cpu_offload else {}
    units = list(layers if layers is not None else decoder_layers(model))
    # Input and output embeddings get units of their own (as torchtitan does), so the root unit
    # holds only small norms and is not kept gathered from forward to backward at vocab x hidden.
    embeddings = [
        m
        for m in (_embedding(model, "get_input_embeddings"), _embedding(model, "get_output_embeddings"))
        if m
    ]
    if len(embeddings) == 2 and embeddings[0].weight is embeddings[1].weight:
        embeddings = []  # tied: one parameter in two modules stays in the root unit
    for unit in [*units, *embeddings]:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _embedding(model: nn.Module, getter: str) -> nn.Module | None:
    get = getattr(model, getter, None)
    module = get() if get is not None else None
    return module if isinstance(module, nn.Module) and hasattr(module, "weight") else None


def load_sharded(
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    cpu_offload: bool = False,
    prepare: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Build a Hugging Face causal LM sharded with FSDP2, reading only this rank's rows from disk.

    Args:
        model_dir: A directory with ``config.json`` and safetensors weights.
        dtype: dtype of the parameters (the files' dtype is converted slice by slice).
        device: The rank's training device.
        cpu_offload: Keep the shards in host memory (``CPUOffloadPolicy``).
        prepare: Called on the meta-device model before sharding, e.g. to swap in SMT layers;
            parameters it adds that the files lack (SMT blocks) start at zero.

    Returns:
        The sharded model, in training mode.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = SafetensorsCheckpoint(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    # Parameters on the meta device, buffers (rotary tables) real: they are recomputed from the
    # config, not read from the files, and to_empty below would leave them uninitialised.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if prepare is not None:
        prepare(model)
    # SMT blocks are deltas from the base: zero at the start, and absent from the files.
    zeros = {f"{name}.blocks" for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers(remove_duplicate=False)}
    shard_model(model, cpu_offload=cpu_offload)
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if name in checkpoint:
                first, count = local_rows(param) if isinstance(param, DTensor) else (0, param.shape[0])
                local.copy_(checkpoint.read_rows(name, first, first + count).to(dtype))
            elif name in zeros:
                local.zero_()
            else:
                raise ValueError(f"{model_dir} holds no weights for parameter '{name}'.")
    # Buffers are not FSDP's: they belong on the compute device, also when shards live in host memory.
    for module_name, module in model.named_modules():
        for name in list(module._buffers):
            if module._buffers[name] is not None:
                key = f"{module_name}.{name}" if module_name else name
                module._buffers[name] = buffers[key].to(device)
    model.train()
    return model


# ---- reading checkpoints as data ----------------------------------------------------------------

# What DCP writes into .metadata (torch 2.4-2.13): its metadata dataclasses, shapes, dtypes, paths.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # every name of the module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not is_dtype and (module not in _ALLOWED or (allowed is not None and name not in allowed)):
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata may hold only DCP's own metadata types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            data = stream.read()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as err:
            raise ValueError(f"{path} is not checkpoint metadata this job can read safely ({err}).") from err
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not checkpoint metadata.")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor items with ``weights_only=True``."""

    def __init__(self, checkpoint: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint = checkpoint

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            stored = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
            where = self.checkpoint / stored.relative_path if stored is not None else self.checkpoint
            raise ValueError(
                f"{where} holds an item that is not plain data ({fqn}); refusing to load it."
            ) from err
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with the checked value
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded
