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

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smt_dist.distributed import barrier, rank
from smt_dist.files.atomic import write_json
from smt_dist.files.state import load_rng, read_checkpoint_json, save_rng
from smt_dist.recipes.failures import write_failure

STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


# What a resume may change, and what must be as the checkpoint's run had it (the rest of the
# arguments): changing these would train other blocks, read the data in another order, or leave a
# checkpoint the next resume cannot load.
RESUMABLE_CHANGES = (
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_steps",
    "max_steps",
    "num_train_epochs",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "dataset_num_proc",
    "run_name",
    "eval_steps",
    "merge",
    "disable_tqdm",
    "report_memory",
    "gradient_checkpointing",
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "deepspeed",
    "fsdp_cpu_offload",
    "local_rank",
    "model_name_or_path",
    "data_path",
    "smt_warmup_steps",
    "smt_selection",
    "config_file",
)


def check_resume(path: Path, state: dict[str, Any], args: dict[str, Any], run: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless this run may continue the checkpoint at ``path``.

    ``args`` are this run's arguments, ``run`` what else identifies it (data digest, backend
    layout); both are compared with what the checkpoint's ``trainer_state.json`` recorded.
    """
    saved_args, saved_run = state.get("args"), state.get("run")
    if not isinstance(saved_args, dict) or not isinstance(saved_run, dict):
        raise ValueError(
            f"{path / STATE_NAME} lacks the arguments of its run; it was written by another version."
        )
    for key in sorted(args):
        if key not in RESUMABLE_CHANGES and saved_args.get(key) != args[key]:
            raise ValueError(
                f"{path} was trained with --{key} {saved_args.get(key)!r}, this run asks for {args[key]!r}; "
                f"a resume may change only {', '.join(RESUMABLE_CHANGES[:10])} and the like."
            )
    for key, value in run.items():
        if saved_run.get(key) != value:
            raise ValueError(f"{path} was written with {key} {saved_run.get(key)!r}, this run has {value!r}.")


def save_checkpoint(
    backend: Any,
    output_dir: Path,
    *,
    step: int,
    state: dict[str, Any],
    write_adapter: Callable[[Path], None],
    keep: int,
    stale: list[Path] = (),
) -> Path:
    """Write checkpoint ``step`` on every rank (a collective call) and prune to ``keep``.

    ``stale`` are an earlier run's checkpoints (``--overwrite_output_dir``): removed once this
    checkpoint is in place, never before.
    """
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.partial"
    if rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    try:
        backend.save(staging)
        save_rng(staging / f"rng_state_{rank()}.safetensors")
        write_adapter(staging / "adapter")
        if rank() == 0:
            write_json(staging / STATE_NAME, state)
    except Exception as err:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(err)
        if reason is None:
            raise
        newest = checkpoints(output_dir)
        raise OSError(
            f"Writing checkpoint-{step} to {output_dir} failed ({reason}); "
            + (
                f"it needs about {_megabytes(newest[-1])} MB, as {newest[-1].name} did, which stays "
                "the newest checkpoint."
                if newest
                else "no checkpoint was kept."
            )
        ) from err
    barrier()
    if rank() == 0:
        if final.exists():  # a resumed or overwriting run saving a step saved before
            shutil.rmtree(final)
        staging.rename(final)
        for old in stale:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _megabytes(directory: Path) -> int:
    return max(1, round(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20))


def load_checkpoint(backend: Any, path: Path) -> dict[str, Any]:
    """Restore the backend's state and this rank's RNG from ``path``; return the trainer state."""
    backend.load(path)
    load_rng(path / f"rng_state_{rank()}.safetensors")
    return read_checkpoint_json(path / STATE_NAME, what="trainer state")


def check_writable(output_dir: Path) -> None:
    """Refuse an output directory that cannot be created or written, before anything runs."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a directory.")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"--output_dir {output_dir} cannot be written ({existing} is not a writable directory)."
        )


def remove_stale(paths: list[Path]) -> None:
    """An overwritten run's checkpoints, once this run's output exists."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
