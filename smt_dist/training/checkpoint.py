"""Checkpoints that a crash cannot half-write, and everything a resume needs to continue exactly.

A checkpoint is ``output_dir/checkpoint-<step>/`` holding the backend's state (the DeepSpeed
engine without frozen weights, or ``BlockShardedAdamW``'s shards and the scheduler), the SMT
adapter (blocks, selection, base fingerprint), every rank's RNG states and ``trainer_state.json``
(step, data position). All ranks
write into ``.checkpoint-<step>.partial`` first; rank 0 renames it into place only after every rank
has finished, so an interrupted save leaves the previous checkpoint the newest complete one.
Checkpoints assume a filesystem shared by all ranks, as DeepSpeed's do.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from smt_dist.io import write_json
from smt_dist.training.logs import rank_from_env

STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """Resolve ``--resume_from_checkpoint``: a checkpoint directory or ``latest``."""
    if spec == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: {output_dir} holds no checkpoint.")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint of this job (no {STATE_NAME}).")
    return path


def save_checkpoint(
    backend: Any,
    output_dir: Path,
    *,
    step: int,
    state: dict[str, Any],
    write_adapter: Callable[[Path], None],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` on every rank (a collective call) and prune to ``keep``."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.partial"
    if rank_from_env() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    backend.save(staging)
    torch.save(_rng_state(), staging / f"rng_state_{rank_from_env()}.pt")
    write_adapter(staging / "adapter")
    if rank_from_env() == 0:
        write_json(staging / STATE_NAME, state)
    _barrier()
    if rank_from_env() == 0:
        if final.exists():  # a resumed run saving a step it had saved before
            shutil.rmtree(final)
        staging.rename(final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(backend: Any, path: Path) -> dict[str, Any]:
    """Restore the backend's state and this rank's RNG from ``path``; return the trainer state."""
    backend.load(path)
    rng_file = path / f"rng_state_{rank_from_env()}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: was the checkpoint written by as many ranks?")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_NAME).read_text())


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
