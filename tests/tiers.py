"""The suite's two tiers: what every run checks, and the whole matrix.

``bash scripts/test.sh`` (the README's test command, CI) deselects tests marked ``slow``: the
launcher, engine and bad-input matrices keep one case of each kind there, and the other cases
of a matrix repeat what that case checks on another engine, launcher or input. ``bash
scripts/test.sh --all`` runs them too.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest


def tiered(values: Iterable, every_run: Iterable, *, ids: Iterable[str] | None = None) -> list:
    """``values`` as parameters (a tuple is one value per argument name), those not in
    ``every_run`` marked ``slow``.

    ``every_run`` names values by themselves or, when ``ids`` is given, by their id. A name in
    ``every_run`` that is no value is an error, so a renamed case cannot drop out of every run.
    """
    values = list(values)
    names = list(ids) if ids is not None else values
    keep = set(every_run)
    unknown = keep - set(names)
    if unknown:
        raise ValueError(f"every_run names no parameter: {sorted(map(str, unknown))}")
    return [
        pytest.param(*(value if isinstance(value, tuple) else (value,)), id=str(name) if ids is not None else None,
                     marks=() if name in keep else pytest.mark.slow)
        for value, name in zip(values, names, strict=True)
    ]  # fmt: skip
