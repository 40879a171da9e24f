"""A Hugging Face safetensors checkpoint on disk, read a slice or a shard at a time.

Models larger than one device are never loaded whole: each rank reads only the rows of each
weight it will hold, the adapter's fingerprint reads a few elements, and the streaming merge reads
one shard at a time. safetensors memory-maps its files, so a slice costs only its own bytes; no
file is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from smt_dist.files.dtypes import safetensors_dtype

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsCheckpoint:
    """The weight files of a model directory: which tensor lives in which file, and its shape.

    Raises ``FileNotFoundError`` when the directory holds no safetensors weights and
    ``ValueError`` when its index or a file is malformed.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise ValueError(
                    f"{index} is not a safetensors index (a JSON object with a weight_map)."
                ) from err
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index} has a malformed weight_map.")
            for name in set(weight_map.values()):
                if Path(name).name != name:
                    raise ValueError(f"{index} names a shard outside its directory: {name!r}.")
            self.files = sorted(set(weight_map.values()))
            self.key_file = dict(weight_map)
        elif (self.directory / SINGLE_NAME).is_file():
            self.files = [SINGLE_NAME]
            self.key_file = {}
        else:
            raise FileNotFoundError(
                f"{self.directory} holds no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); "
                "save the model with save_pretrained(safe_serialization=True)."
            )
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for file in self.files:
            with self.open(file) as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor_slice = handle.get_slice(key)
                    self.shapes[key] = tuple(tensor_slice.get_shape())
                    self.dtypes[key] = safetensors_dtype(tensor_slice.get_dtype())
                    self.key_file.setdefault(key, file)
        missing = sorted(set(self.key_file) - set(self.shapes))
        if missing:
            raise ValueError(f"{index} lists tensors that no shard holds, e.g. {missing[0]!r}.")

    @contextmanager
    def open(self, file: str) -> Iterator:
        """A ``safe_open`` handle on one weight file, with a one-sentence error when it is broken."""
        path = self.directory / file
        try:
            with safe_open(str(path), framework="pt") as handle:
                yield handle
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is truncated or not a safetensors file ({err}).") from err

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor (its first dimension), in the file's dtype."""
        with self.open(self.key_file[key]) as handle:
            return handle.get_slice(key)[start:stop]

    def read_elements(self, key: str, positions: torch.Tensor) -> torch.Tensor:
        """Elements at flat ``positions`` of a tensor, as fp32, reading one row per element."""
        shape = self.shapes[key]
        row_size = 1
        for size in shape[1:]:
            row_size *= size
        values = []
        with self.open(self.key_file[key]) as handle:
            tensor_slice = handle.get_slice(key)
            for position in positions.tolist():
                row, column = divmod(int(position), row_size)
                values.append(tensor_slice[row : row + 1].reshape(-1)[column].float())
        return torch.stack(values)

    def shard_tensors(self, file: str) -> dict[str, torch.Tensor]:
        """Every tensor of one weight file (the unit of the streaming merge)."""
        with self.open(file) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
