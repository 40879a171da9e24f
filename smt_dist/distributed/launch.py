"""Joining a job's process group under torchrun or mpirun, without DeepSpeed.

torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the master address; mpirun does not,
so under MPI the ranks learn them from mpi4py and rank 0's host becomes the master.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def init_process_group() -> None:
    """Initialise ``torch.distributed`` from the launcher's environment (gloo on CPU, nccl on GPU)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        _environment_from_mpi()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def leave_process_group(*, together: bool = True) -> None:
    """Tear the group down before the interpreter exits; ``together`` waits for every rank first.

    A rank that exits while gloo's threads are still alive aborts ("terminate called without an
    active exception", exit -6), which fails a torchrun job whose work is done. A failing rank
    leaves alone (``together=False``): its peers may never reach a barrier.
    """
    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    try:
        dist.destroy_process_group()
    except Exception:  # a peer already tore its side down; nothing is left to release cleanly
        if together:
            raise


def _environment_from_mpi() -> None:
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(
            "No RANK in the environment and no mpi4py: start the job with torchrun or mpirun."
        ) from err
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    master = comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)
    os.environ.update(
        RANK=str(comm.Get_rank()),
        WORLD_SIZE=str(comm.Get_size()),
        LOCAL_RANK=str(local.Get_rank()),
        LOCAL_WORLD_SIZE=str(local.Get_size()),
    )
    os.environ.setdefault("MASTER_ADDR", master)
    os.environ.setdefault("MASTER_PORT", "29500")
