"""One sentence from one rank when a user's input stops a distributed job; quiet exits elsewhere.

Errors a user can cause (bad arguments, files, configs, checkpoints, a full disk) are
``ValueError`` or ``OSError`` with a message that names the file. Before the process group exists
every rank sees the same inputs, so rank 0 alone reports. Afterwards the first rank to fail claims
the report through the job's c10d store (the rendezvous every rank already shares), prints, and
exits; a rank whose collective then breaks because a peer left finds the claim (or finds rank 0,
the store's host, gone after reporting) and exits quietly. Anything else is an internal error and
keeps its traceback.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

USER_ERRORS = (ValueError, OSError)
_KEY = "smt_dist/failure"


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def claim_report(message: str, *, rank: int) -> bool:
    """True on the one rank that should print ``message``; every failing rank calls it."""
    if not dist.is_initialized():
        return rank == 0
    try:
        store = _store()
        claimed = store.compare_set(_KEY, "", f"{rank}: {message}")
        return claimed.decode() == f"{rank}: {message}"
    except Exception:  # no store left to agree through: say it here
        return True


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
