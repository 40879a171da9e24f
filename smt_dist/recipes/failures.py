"""One sentence from one rank when a user's input stops a distributed job; quiet exits elsewhere.

Errors a user can cause (bad arguments, files, configs, checkpoints, a full disk) are
``ValueError`` or ``OSError`` with a message that names the file. The first rank to fail claims
the report through the job's c10d store (the rendezvous every rank shares), prints, and exits; a
rank whose collective then breaks because a peer left finds the claim (or finds rank 0, the
store's host, gone after reporting) and exits quietly. A rank that fails before the process group
exists (its own data file missing, say, while its peers' inputs are sound) first joins the group
its peers are forming, so that it, and only one rank, says why and the peers stop instead of
waiting for it. Anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from smt_dist.distributed import world_size
from smt_dist.distributed.launch import init_process_group

USER_ERRORS = (ValueError, OSError)
_KEY = "smt_dist/failure"


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def claim_report(message: str, *, rank: int) -> bool:
    """True on the one rank that should print ``message``; every failing rank calls it."""
    joined = not dist.is_initialized()
    if joined:
        if world_size() <= 1:
            return True
        try:
            init_process_group()  # the peers may be sound and waiting for this rank to join
        except Exception:  # no group to join: every rank saw the same inputs, rank 0 speaks
            return rank == 0
    try:
        store = _store()
        claimed = store.compare_set(_KEY, "", f"{rank}: {message}")
        return claimed.decode() == f"{rank}: {message}"
    except Exception:  # no store left to agree through; before joining, its host (rank 0) left first
        return not joined or rank == 0


def peer_failed() -> bool:
    """After a broken collective: did another rank stop the job (claimed, or its store is gone)?"""
    if not dist.is_initialized():
        return False
    try:
        store = _store()
        store.set_timeout(datetime.timedelta(seconds=5))
        return store.check([_KEY])
    except Exception:  # rank 0 hosts the store; gone means it stopped first
        return True


def write_failure(err: BaseException) -> str | None:
    """What went wrong, when ``err`` is a full disk or a file-size limit; ``None`` otherwise.

    Python raises ``OSError``; safetensors' Rust writer raises ``SafetensorError`` carrying the OS
    message; ``torch.save``'s zip writer (DeepSpeed's checkpoints) a ``RuntimeError`` "unexpected pos".
    """
    if isinstance(err, OSError):
        return (err.strerror or str(err)) + (f": {err.filename}" if err.filename else "")
    text = str(err)
    if not any(s in text for s in ("No space left", "File too large", "Disk quota", "unexpected pos")):
        return None
    return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)


@contextmanager
def reported_writes(what: str) -> Iterator[None]:
    """Turn a full disk while doing ``what`` ("Writing the adapter to ...") into one sentence."""
    try:
        yield
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise OSError(f"{what} failed ({reason}).") from err
