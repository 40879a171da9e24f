"""Spawn a function, or a script, on N CPU ranks with the gloo backend, as a real job would run."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FSDPModule


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; a rank's error fails it."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    # What torchrun would set; DeepSpeed reads LOCAL_RANK and friends from the environment.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # Every rank's collectives are done before any rank tears gloo down: a rank that destroys
        # its group while a peer still sends can abort in gloo's worker threads.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_script_on_ranks(
    script: Path,
    argvs: list[list[str]],
    *,
    cwd: Path,
    timeout: int = 240,
    file_size_limit: int | None = None,
) -> list[subprocess.CompletedProcess]:
    """``script`` as one process per rank (one argv each), with torchrun's environment.

    Unlike torchrun, every rank's own exit code and stderr come back. ``file_size_limit`` (bytes,
    ``RLIMIT_FSIZE``) makes every larger write fail as a full disk would, with ``EFBIG`` (Python
    ignores ``SIGXFSZ``).
    """

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    port = str(free_port())
    procs = []
    for rank, argv in enumerate(argvs):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(len(argvs)),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *argv],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=limit if file_size_limit else None,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Full parameters in every FSDP unit inside the block (a collective call on all ranks)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
