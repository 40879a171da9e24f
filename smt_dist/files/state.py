"""The job's own checkpoint state in files that cannot run code: safetensors and JSON, never pickle.

Checkpoints get shared and downloaded, and ``--resume_from_checkpoint`` reads whatever it is
handed, so nothing the job writes is unpickled on the way back: tensors go into safetensors, the
rest into JSON (inside the safetensors metadata where both belong together). A malformed file is a
``ValueError`` naming it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smt_dist.files.jsonfile import read_json

_META_KEY = "json"


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Tensors (safetensors) and a JSON-ready dict (in the file's metadata) in one file."""
    save_file(
        {name: t.detach().contiguous().cpu() for name, t in tensors.items()},
        str(path),
        metadata={_META_KEY: json.dumps(meta)},
    )


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What ``save_state`` wrote; ``ValueError`` naming the file when it is anything else."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: was the checkpoint written by this backend and world size?"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            meta = json.loads((handle.metadata() or {})[_META_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a checkpoint state file written by this job ({err}).") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a checkpoint state file written by this job.")
    return tensors, meta


def read_checkpoint_json(path: Path, *, what: str) -> Any:
    """A JSON file of a checkpoint (``what`` it holds, e.g. "trainer state"), or one sentence naming it."""
    return read_json(
        path, what=what[0].upper() + what[1:], context=f"; the checkpoint's {what} is damaged or missing"
    )


def save_rng(path: Path) -> None:
    """This process's Python, NumPy, torch (and CUDA) random states."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, int(position), int(has_gauss), float(cached)],
    }
    save_state(path, tensors, meta)


def load_rng(path: Path) -> None:
    """Restore what ``save_rng`` wrote."""
    tensors, meta = load_state(path)
    try:
        version, internal, gauss = meta["python"]
        kind, position, has_gauss, cached = meta["numpy"]
        random.setstate((version, tuple(internal), gauss))
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, position, has_gauss, cached))
        torch.set_rng_state(tensors["torch"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a random-state file written by this job ({err}).") from err
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
