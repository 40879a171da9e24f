"""Spawn a function on N CPU ranks with the gloo backend, as a real job would run."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

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
