"""FSDP2 (``fully_shard``) for SMT models: one unit per decoder layer, blocks sharded whole.

FSDP2 shards every parameter on dim 0. For a block parameter ``[nb, l, l]`` dim 0 counts blocks,
so each rank holds whole blocks; frozen weights are sharded by rows and never get gradients, so
FSDP reduce-scatters only the blocks' gradients. ``SparseLinear`` saves its weight Parameter for
backward and never writes it, which is what FSDP's free-and-refill of unsharded storage needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a decoder: the longest ``nn.ModuleList`` named ``layers`` or ``h``."""
    candidates = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h")
    ]
    if not candidates:
        raise ValueError(
            "Found no decoder layers (an nn.ModuleList named 'layers' or 'h'); pass layers= explicitly."
        )
    return list(max(candidates, key=len))


def shard_model(
    model: nn.Module,
    *,
    layers: list[nn.Module] | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer, then to the root, in place; returns the model.

    Args:
        model: An SMT model (after ``apply_smt``), on its training device.
        layers: The modules that each become an FSDP unit (default: ``decoder_layers(model)``).
        cpu_offload: Keep sharded parameters (frozen weights included) in host memory.
    """
    kwargs = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if cpu_offload else {}
    for layer in layers if layers is not None else decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


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
