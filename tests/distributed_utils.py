"""Spawn a function, or a script, on N CPU ranks with the gloo backend, as a real job would run."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
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


def run_command(
    command: list[str], *, cwd: Path, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``command`` with its output captured; past ``timeout`` seconds it and all its descendants die.

    A launcher's ranks are its children (torchrun's in sessions of their own): killing only the
    launcher, as ``subprocess.run`` does, would leave them running, or hung in a collective,
    beside every later test. A timeout fails the test with the output so far.
    """
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_showing_stacks([proc.pid], ranks=leaves(proc.pid))
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(command)}\nran past {timeout} s and was killed:\n{out[-3000:]}{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def leaves(pid: int) -> list[int]:
    """The processes under ``pid`` that have none of their own: a launcher's ranks."""
    import psutil

    found = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if not process.children():
                    found.append(process.pid)
    return found


def stop_showing_stacks(roots: list[int], *, ranks: list[int]) -> None:
    """Ask ``ranks`` where they wait, then SIGKILL ``roots`` and everything under them.

    ``launch/train.py`` prints every thread's stack on SIGUSR1, to the stderr a timeout reports.
    """
    for pid in ranks:  # one at a time: stacks written at once to one pipe interleave mid-line
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
    time.sleep(3)  # faulthandler writes at once; this lets the launchers pass the lines on
    for pid in roots:
        kill_tree(pid)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant it has, whatever their process group."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for process in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


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
    # Passed and torn down: leave without the interpreter's shutdown, where a thread gloo or FSDP2
    # left behind could still abort the process ("terminate called without an active exception",
    # SIGABRT) after the test's work is done; seen about once in 20 full runs of the FSDP2 tests.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_script_on_ranks(
    script: Path,
    argvs: list[list[str]],
    *,
    cwd: Path,
    timeout: int = 240,
    file_size_limit: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> list[subprocess.CompletedProcess]:
    """``script`` as one process per rank (one argv each), with torchrun's environment.

    Unlike torchrun, every rank's own exit code and stderr come back. ``file_size_limit`` (bytes,
    ``RLIMIT_FSIZE``) makes every larger write fail as a full disk would, with ``EFBIG`` (Python
    ignores ``SIGXFSZ``). ``extra_env`` adds to every rank's environment.
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
            **(extra_env or {}),
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
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pids = [proc.pid for proc in procs]
        stop_showing_stacks(pids, ranks=pids)  # no rank outlives the test
        errors = [r.stderr for r in results] + [proc.communicate()[1] for proc in procs[len(results) :]]
        errors = [error[-3000:] for error in errors]
        raise AssertionError(f"{script} ran past {timeout} s and was killed:\n" + "\n".join(errors)) from None
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
