"""torch.distributed.checkpoint, read without running code a checkpoint file could plant.

DCP's file reader unpickles ``.metadata`` with plain ``pickle`` and its default planner reads
non-tensor items with ``torch.load(weights_only=False)``: a checkpoint handed to a resume could
run anything. These subclasses read the metadata with an unpickler that builds only DCP's own
metadata types, and non-tensor items with ``weights_only=True``; anything else is a
``ValueError`` naming the checkpoint.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

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
            raise ValueError(
                f"{self.checkpoint} holds an item that is not plain data ({fqn}); refusing to load it."
            ) from err
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with the checked value
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded
