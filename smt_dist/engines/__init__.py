"""The engines the training job can run on, by name; each lives in its own module, whole.

Adding an engine means one module with a ``Backend`` subclass and one line in ``BACKENDS``; the
job asks ``backend_class`` for it and never names an engine itself. Modules are imported only when
their engine is chosen, so a torch or FSDP run never imports DeepSpeed.
"""

from __future__ import annotations

import importlib

from smt_dist.engines.base import Backend

BACKENDS = {
    "deepspeed": "smt_dist.engines.deepspeed:DeepSpeedBackend",
    "torch": "smt_dist.engines.torch:TorchBackend",
    "fsdp": "smt_dist.engines.fsdp:FsdpBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The ``Backend`` subclass registered under ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}.")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["BACKENDS", "Backend", "backend_class"]
