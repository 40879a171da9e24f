"""FSDP2 (``fully_shard``) for SMT models: built sharded, one unit per decoder layer, blocks whole.

FSDP2 shards every parameter on dim 0. For a block parameter ``[nb, l, l]`` dim 0 counts blocks,
so each rank holds whole blocks; frozen weights are sharded by rows and never get gradients, so
FSDP reduce-scatters only the blocks' gradients. ``SparseLinear`` saves its weight Parameter for
backward and never writes it, which is what FSDP's free-and-refill of unsharded storage needs.

``load_sharded`` never materialises the model on any rank: the model is built on the meta device,
sharded, given storage for this rank's rows only, and each rank reads exactly those rows from the
safetensors files. Every rank reading its own slice (rather than rank 0 reading everything and
broadcasting, as torchtune does) keeps rank 0's memory at one slice too and needs no broadcast;
it assumes the checkpoint is on a filesystem every node can read, as checkpoints here do anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from smt_dist.checkpoint_files import SafetensorsCheckpoint
from smt_dist.distributed.params import local_rows
from smt_dist.layer import SparseLinear
from smt_dist.model import decoder_layers


def shard_model(
    model: nn.Module,
    *,
    layers: list[nn.Module] | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer, then to the root, in place; returns the model.

    Args:
        model: The model (plain or after ``apply_smt``), on its training device or the meta device.
        layers: The modules that each become an FSDP unit (default: ``decoder_layers(model)``).
        cpu_offload: Keep sharded parameters (frozen weights included) in host memory.
    """
    kwargs = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if cpu_offload else {}
    units = list(layers if layers is not None else decoder_layers(model))
    # Input and output embeddings get units of their own (as torchtitan does), so the root unit
    # holds only small norms and is not kept gathered from forward to backward at vocab x hidden.
    embeddings = [
        m
        for m in (_embedding(model, "get_input_embeddings"), _embedding(model, "get_output_embeddings"))
        if m
    ]
    if len(embeddings) == 2 and embeddings[0].weight is embeddings[1].weight:
        embeddings = []  # tied: one parameter in two modules stays in the root unit
    for unit in [*units, *embeddings]:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _embedding(model: nn.Module, getter: str) -> nn.Module | None:
    get = getattr(model, getter, None)
    module = get() if get is not None else None
    return module if isinstance(module, nn.Module) and hasattr(module, "weight") else None


def load_sharded(
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    cpu_offload: bool = False,
    prepare: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Build a Hugging Face causal LM sharded with FSDP2, reading only this rank's rows from disk.

    Args:
        model_dir: A directory with ``config.json`` and safetensors weights.
        dtype: dtype of the parameters (the files' dtype is converted slice by slice).
        device: The rank's training device.
        cpu_offload: Keep the shards in host memory (``CPUOffloadPolicy``).
        prepare: Called on the meta-device model before sharding, e.g. to swap in SMT layers;
            parameters it adds that the files lack (SMT blocks) start at zero.

    Returns:
        The sharded model, in training mode.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = SafetensorsCheckpoint(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    # Parameters on the meta device, buffers (rotary tables) real: they are recomputed from the
    # config, not read from the files, and to_empty below would leave them uninitialised.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if prepare is not None:
        prepare(model)
    # SMT blocks are deltas from the base: zero at the start, and absent from the files.
    zeros = {f"{name}.blocks" for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers(remove_duplicate=False)}
    shard_model(model, cpu_offload=cpu_offload)
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if name in checkpoint:
                first, count = local_rows(param) if isinstance(param, DTensor) else (0, param.shape[0])
                local.copy_(checkpoint.read_rows(name, first, first + count).to(dtype))
            elif name in zeros:
                local.zero_()
            else:
                raise ValueError(f"{model_dir} holds no weights for parameter '{name}'.")
    # Buffers are not FSDP's: they belong on the compute device, also when shards live in host memory.
    for module_name, module in model.named_modules():
        for name in list(module._buffers):
            if module._buffers[name] is not None:
                key = f"{module_name}.{name}" if module_name else name
                module._buffers[name] = buffers[key].to(device)
    model.train()
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
