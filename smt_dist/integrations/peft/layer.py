"""The peft tuner layer: a base linear plus, per adapter, the trained blocks beside it.

Each adapter's blocks are a small module (``SMTBlocks``: ``blocks`` and ``block_index``, in
``SparseLinear``'s column-major order) inside a ``ModuleDict``, as LoRA keeps ``lora_A``: peft
finds, saves, loads, freezes and switches them by adapter name, and DeepSpeed ZeRO-3 gathers
their parameters when the module runs. The forward is SMT's own autograd:

- over a plain, whole ``nn.Linear`` it is ``SparseLinear``'s (``sparse_linear``), so a peft
  model computes exactly what ``apply_smt`` makes, bit for bit;
- over anything else (a weight ZeRO-3 partitioned, a quantized layer of bitsandbytes or torchao,
  a layer of another type) the base layer runs its own forward and the blocks' products are added
  to its output (``add_block_products``).

Merging adds the blocks into the base weight and keeps the base's values under them, so
``unmerge`` restores the base bit for bit.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from smt_dist.core.blocks import gather_blocks, scatter_blocks, weight_shape
from smt_dist.core.layer import (
    SparseLinear,
    add_block_products,
    is_plain_linear,
    register_derived_index,
    sparse_linear,
)
from smt_dist.core.quantized import float_dtype, keep_layout, quantization


class SMTBlocks(nn.Module):
    """One adapter's blocks of one layer: ``blocks`` ``[nb, l, l]`` (deltas from the base, zero at
    the start) and ``block_index`` ``[nb, 2]``."""

    def __init__(self, block_index: torch.Tensor, block_size: int, *, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.block_size = block_size
        self.register_buffer("block_index", block_index.to(device))
        self.blocks = nn.Parameter(
            torch.zeros(len(block_index), block_size, block_size, dtype=dtype, device=device)
        )
        register_derived_index(self)
        self.register_load_state_dict_post_hook(lambda module, _: register_derived_index(module))

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if is_plain_linear(base_layer) and not hasattr(base_layer.weight, "ds_id"):
            return sparse_linear(x, base_layer.weight, base_layer.bias, self, save_input=False)
        return add_block_products(x, base_layer(x), self)

    def delta(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The blocks as a dense ``[out, in]`` delta (zero outside them)."""
        zeros = torch.zeros(shape, dtype=dtype, device=self.blocks.device)
        return scatter_blocks(zeros, self.block_index, self.blocks.detach().to(dtype), add=False)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, num_blocks={len(self.block_index)}"


class SMTLayer(nn.Module, BaseTunerLayer):
    """A base linear with SMT blocks for one or more named adapters."""

    adapter_layer_names = ("smt_blocks",)
    other_param_names = ()

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, block_index: torch.Tensor, block_size: int
    ) -> None:
        super().__init__()
        keep_layout(base_layer)
        self.base_layer = base_layer
        self.smt_blocks = nn.ModuleDict()
        self._merged_base: dict[str, torch.Tensor] = {}  # per merged adapter: the base under its blocks
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features, self.in_features = weight_shape(base_layer.weight)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, block_index, block_size)

    def update_layer(self, adapter_name: str, block_index: torch.Tensor, block_size: int) -> None:
        """Add an adapter's blocks (zero) at ``block_index``, checked against this layer's grid."""
        weight = self.get_base_layer().weight
        index = SparseLinear.check_index(block_index, weight_shape(weight), block_size, name=adapter_name)
        dtype = float_dtype(self.get_base_layer())
        device = "cpu" if weight.device.type == "meta" else weight.device
        self.smt_blocks[adapter_name] = SMTBlocks(index, block_size, dtype=dtype, device=device)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.smt_blocks]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        y = self.smt_blocks[active[0]](x, self.base_layer)
        for name in active[1:]:  # several adapters at once: the others' products on top
            y = add_block_products(x, y, self.smt_blocks[name])
        return y

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        base = self.get_base_layer()
        return self.smt_blocks[adapter_name].delta(weight_shape(base.weight), float_dtype(base))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' blocks into the base weight (``W + D``), keeping the values under them."""
        kind = quantization(self.get_base_layer())
        if kind is not None:
            raise ValueError(
                f"Cannot merge SMT blocks into a quantized weight ({kind}) in place; merge into the "
                "original float checkpoint with python -m smt_dist.merge, or call "
                "smt_dist.merge_smt on the SMT model for dense dequantized(W) + D layers."
            )
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.smt_blocks:
                continue
            adapter, weight = self.smt_blocks[name], self.get_base_layer().weight
            with torch.no_grad():
                under = gather_blocks(weight.detach(), adapter.block_index, adapter.block_size)
                merged = scatter_blocks(
                    weight.detach(), adapter.block_index, adapter.blocks.detach(), add=True
                )
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"Merging the SMT adapter '{name}' gives NaN or infinity; it is broken.")
                weight.copy_(merged)
            self._merged_base[name] = under
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put back the base values under each merged adapter's blocks, exactly, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                index = self.smt_blocks[name].block_index
                weight.copy_(scatter_blocks(weight.detach(), index, self._merged_base.pop(name), add=False))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "smt." + super().__repr__()
