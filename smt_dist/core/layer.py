"""``SparseLinear``: a frozen linear layer plus a few trainable ``l x l`` blocks.

This is the layer that makes SMT cheap. The forward is exact (``x @ W_eff.T + b`` with
``W_eff = W + D`` inside the selected blocks), but the backward computes a gradient only for the
selected blocks, and the forward saves only the input column-blocks those blocks read. Gradient,
optimizer and activation memory therefore scale with the number of selected blocks.

The trainable values are *deltas* from the frozen base, zero-initialised: the adapter is
independent of the base and merging is an addition. With AdamW weight decay this decays the
delta towards the base weight, not the block towards zero (the authors' code decays the block).

Over a base layer of another kind (a quantized bitsandbytes or torchao linear,
``smt_dist.core.quantized``), the layer keeps it whole as ``base_layer`` and adds the blocks'
products to that layer's own output (``add_block_products``): ``y = base(x) + scatter(x_cols @ D.T)``,
the base computing its own forward and input gradient. Its ``weight`` and ``bias`` are then the
base layer's.

Two rules keep the layer usable under DeepSpeed ZeRO-3 and FSDP2, which swap a parameter's
storage in and out around the owning module's forward and backward: the base ``weight`` is saved
for backward as the Parameter itself (never a copy, never a view of its storage), and the layer
never writes into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smt_dist.core.blocks import block_grid, scatter_blocks, sort_column_major, weight_shape
from smt_dist.core.quantized import dequantized, float_dtype, keep_layout

# A layer whose blocks cover at least this share of its weight computes with W + D, merged in a
# transient copy, instead of batched block products: the copy (2 out x in elements, forward and
# backward) then costs less than the two extra block products (4 N x covered area FLOPs) for any
# training batch of more than a few hundred tokens, on CPUs and GPUs alike.
MERGE_AREA = 0.25


class _SparseBlockLinear(torch.autograd.Function):
    """``y = x @ W.T + b + scatter(x_cols @ D.T)`` with gradients for ``x`` and ``D`` only.

    Shapes: ``x`` is ``[N, in]`` (leading dims are flattened by the caller), ``blocks`` (``D``) is
    ``[nb, l, l]``; ``rows``/``cols`` hold each block's row- and column-block; ``saved_cols`` the
    distinct column-blocks (sorted) and ``col_slot`` each block's position among them.

    Gathered block data is block-major (``[blocks, N, l]``): gathering whole blocks along dim 0
    of a ``[in/l, N, l]`` view is about 10x faster on CPU than along dim 1, and it is the layout
    ``bmm`` wants. Scattering back goes along dim 1 of ``[N, k, l]``, which is the fast direction
    for ``index_add_`` and an in-place op on a plain view that ``torch.compile`` accepts.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, blocks, rows, cols, saved_cols, col_slot, plan):
        dtype, l = x.dtype, blocks.shape[-1]
        # Distinct input column-blocks read by the selected blocks: the only activation kept,
        # either as a copy or (save_input) as the input itself, shared with sibling readers.
        x_cols = _block_major(x, l).index_select(0, saved_cols)  # [nu, N, l]
        if plan.merged:  # W + D in a transient copy: one dense product instead of a batch of blocks
            y = F.linear(
                x, _merged(weight, blocks, rows, cols, dtype), None if bias is None else bias.to(dtype)
            )
        else:
            y = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
            _add_block_products(y, x_cols, blocks, rows, col_slot, plan.cols_distinct)
        ctx.save_for_backward(
            x if plan.save_input else x_cols, weight, blocks, rows, cols, saved_cols, col_slot
        )
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_saved, weight, blocks, rows, cols, saved_cols, col_slot = ctx.saved_tensors
        needs_x, _, needs_bias, needs_blocks = ctx.needs_input_grad[:4]
        plan, l = ctx.plan, blocks.shape[-1]
        if plan.save_input and needs_blocks:
            x_saved = _block_major(x_saved, l).index_select(0, saved_cols)
        grad_y = grad_y.contiguous()
        grad_y_per_block = _block_major(grad_y, l).index_select(0, rows)  # [nb, N, l]

        grad_x = grad_bias = grad_blocks = None
        if needs_x:
            if plan.merged:
                grad_x = grad_y @ _merged(weight, blocks, rows, cols, grad_y.dtype)
            else:
                grad_x = grad_y @ weight.to(grad_y.dtype)
                _add_transposed_products(grad_x, grad_y_per_block, blocks, cols)
        if needs_bias:
            grad_bias = grad_y.sum(0)
        if needs_blocks:
            grad_blocks = _block_gradients(grad_y_per_block, x_saved, blocks, col_slot, plan.cols_distinct)
        return grad_x, None, grad_bias, grad_blocks, None, None, None, None, None


class _AddBlockProducts(torch.autograd.Function):
    """``y + scatter(x_cols @ D.T)``: the blocks' part alone, added to a base layer's own output.

    For a base layer whose forward and input gradient are its own business (partitioned by ZeRO-3,
    quantized, wrapped): ``y`` is that layer's output, and its gradient passes through unchanged.
    The same block products as ``_SparseBlockLinear``'s, in the same order, so over a plain
    ``nn.Linear`` both give the same values bit for bit (unless that one merges).
    """

    @staticmethod
    def forward(ctx, x, y, blocks, rows, cols, saved_cols, col_slot, cols_distinct):
        l = blocks.shape[-1]
        x_cols = _block_major(x, l).index_select(0, saved_cols)
        y = y.clone()
        _add_block_products(y, x_cols, blocks, rows, col_slot, cols_distinct)
        ctx.save_for_backward(x_cols, blocks, rows, cols, col_slot)
        ctx.cols_distinct, ctx.in_features = cols_distinct, x.shape[-1]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_cols, blocks, rows, cols, col_slot = ctx.saved_tensors
        needs_x, needs_y, needs_blocks = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        grad_per_block = _block_major(grad_out, blocks.shape[-1]).index_select(0, rows)
        grad_x = grad_blocks = None
        if needs_x:
            grad_x = grad_out.new_zeros(grad_out.shape[0], ctx.in_features)
            _add_transposed_products(grad_x, grad_per_block, blocks, cols)
        if needs_blocks:
            grad_blocks = _block_gradients(grad_per_block, x_cols, blocks, col_slot, ctx.cols_distinct)
        return grad_x, grad_out if needs_y else None, grad_blocks, None, None, None, None, None


def _add_block_products(y, x_cols, blocks, rows, col_slot, cols_distinct: bool) -> None:
    """``y[:, rows_k] += x_cols_k @ D_k.T`` for every block, in place, batched over blocks."""
    l = blocks.shape[-1]
    x_per_block = x_cols if cols_distinct else x_cols.index_select(0, col_slot)  # [nb, N, l]
    y_delta = torch.bmm(x_per_block, blocks.to(y.dtype).transpose(1, 2))
    _row_blocks(y, l).index_add_(1, rows, y_delta.transpose(0, 1))


def _add_transposed_products(grad_x, grad_y_per_block, blocks, cols) -> None:
    """``grad_x[:, cols_k] += dY_k @ D_k`` for every block, in place."""
    grad_x_delta = torch.bmm(grad_y_per_block, blocks.to(grad_x.dtype))
    _row_blocks(grad_x, blocks.shape[-1]).index_add_(1, cols, grad_x_delta.transpose(0, 1))


def _block_gradients(grad_y_per_block, x_cols, blocks, col_slot, cols_distinct: bool) -> torch.Tensor:
    """``dD_k = dY[:, rows_k]^T @ X[:, cols_k]``, summed over every token, batched over blocks."""
    x_per_block = x_cols if cols_distinct else x_cols.index_select(0, col_slot)
    return torch.bmm(grad_y_per_block.transpose(1, 2), x_per_block).to(blocks.dtype)


@dataclass(frozen=True)
class _Plan:
    """How one layer runs: which activation it keeps, and whether it merges its blocks."""

    cols_distinct: bool
    """One block per column-block: the saved columns already line up with the blocks."""
    save_input: bool
    """Keep the whole input (by reference) rather than a copy of its column-blocks."""
    merged: bool
    """Compute with ``W + D`` (a transient copy of the weight) instead of batched block products."""


def _merged(
    weight: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dtype
) -> torch.Tensor:
    """A new ``W + D`` in ``dtype``; the weight itself is never written."""
    l = blocks.shape[-1]
    merged = weight.to(dtype, copy=True)
    grid = merged.view(merged.shape[0] // l, l, merged.shape[1] // l, l).permute(0, 2, 1, 3)
    grid.index_put_((rows, cols), blocks.to(dtype), accumulate=True)
    return merged


def _row_blocks(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """View ``[N, k*l]`` as ``[N, k, l]`` (no copy)."""
    return matrix.view(matrix.shape[0], -1, block_size)


def _block_major(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """View ``[N, k*l]`` as ``[k, N, l]`` (no copy), so whole blocks index along dim 0."""
    return _row_blocks(matrix, block_size).transpose(0, 1)


class SparseLinear(nn.Module):
    """A linear layer whose only trainable values are a set of ``l x l`` weight blocks.

    Made from an existing ``nn.Linear`` with ``SparseLinear.from_linear`` (``apply_smt`` does it
    for a whole model). ``block_index`` (``[nb, 2]``, row-block and column-block) is kept sorted
    column-major (by column-block, then row-block), the one block order used everywhere: in
    selections, adapters and optimizer state; ``blocks[k]`` is the block at ``block_index[k]``.
    """

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_index: torch.Tensor,
        *,
        block_size: int,
        blocks_dtype: torch.dtype | None = None,
        name: str = "SparseLinear",
    ) -> SparseLinear:
        """Wrap an existing linear, reusing its Parameters (no copy).

        A plain ``nn.Linear`` lends its ``weight`` and ``bias``; any other linear (quantized) is
        kept whole as ``base_layer``. Blocks default to the weight's float dtype."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = weight_shape(linear.weight)
        layer.block_size = block_size
        layer.name = name
        if is_plain_linear(linear):
            layer.weight = linear.weight
            layer.bias = linear.bias
        else:
            keep_layout(linear)
            layer.base_layer = linear
        for param in linear.parameters():
            param.requires_grad_(False)
        layer._init_blocks(block_index, blocks_dtype or float_dtype(linear))
        return layer

    def __getattr__(self, name: str):
        # Over a kept base layer, ``weight`` and ``bias`` are that layer's own.
        if name in ("weight", "bias") and "base_layer" in self.__dict__["_modules"]:
            return getattr(self.__dict__["_modules"]["base_layer"], name)
        return super().__getattr__(name)

    def _init_blocks(self, block_index: torch.Tensor, blocks_dtype: torch.dtype) -> None:
        index = self.check_index(block_index, weight_shape(self.weight), self.block_size, name=self.name)
        device = self.weight.device
        # A model built on the meta device (to be sharded, then loaded) still needs real indices.
        self.register_buffer("block_index", index.to("cpu" if device.type == "meta" else device))
        self.blocks = nn.Parameter(
            torch.zeros(len(index), self.block_size, self.block_size, device=device, dtype=blocks_dtype)
        )
        register_derived_index(self)
        self.register_load_state_dict_post_hook(lambda module, _: register_derived_index(module))
        self.save_input = False
        """Keep the whole input for backward, by reference, instead of a copy of the column-blocks
        the blocks read. Modules that read one input (q, k, v) then keep it once between them;
        ``apply_smt`` sets it where that costs less (``smt_dist.core.surgery.share_inputs``)."""
        self.merge_on_save = False
        """``state_dict()`` gives ``weight`` as ``W + D`` (and marks it), so saving code written
        for plain models writes the fine-tuned weights; loading such a state dict back takes the
        blocks out of the weight again. Only for unpartitioned values (an engine that gathers
        partitioned parameters itself walks them, not this hook)."""
        self.register_state_dict_post_hook(_merge_weight_on_save)
        self.register_load_state_dict_pre_hook(_unmerge_weight_on_load)

    @staticmethod
    def check_index(
        block_index: torch.Tensor, shape: tuple[int, int] | torch.Size, block_size: int, *, name: str
    ) -> torch.Tensor:
        """Validate block coordinates for a weight of ``shape``; return them in the layer's order.

        Raises ``ValueError`` naming the module for a block outside the grid, a repeated block or a
        block size that does not divide the weight.
        """
        n_rows, n_cols = block_grid(shape, block_size, name=name)
        return _checked_index(block_index, n_rows, n_cols, name=name)

    @property
    def column_coverage(self) -> float:
        """Share of the input's column-blocks that the selected blocks read (what a copy keeps)."""
        return len(self._saved_cols) / (self.in_features // self.block_size)

    @property
    def num_blocks(self) -> int:
        """How many blocks this layer trains (also while an engine partitions ``blocks``)."""
        return self.block_index.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError(
                f"The base weight of '{self.name}' requires grad; SMT trains only its blocks. "
                "Freeze it with weight.requires_grad_(False)."
            )
        if "base_layer" in self._modules:
            return add_block_products(x, self.base_layer(x), self)
        return sparse_linear(x, self.weight, self.bias, self, save_input=self.save_input)

    @torch.no_grad()
    def merged_weight(
        self, weight: torch.Tensor | None = None, blocks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A new tensor ``W + D`` in the weight's dtype; the base weight is not touched.

        ``weight`` and ``blocks`` stand in for the module's own when those are partitioned (the
        caller gathered them)."""
        weight = dequantized(self) if weight is None else weight  # a float weight is itself
        blocks = self.blocks.detach() if blocks is None else blocks
        return scatter_blocks(weight, self.block_index.to(weight.device), blocks.to(weight.device), add=True)

    def to_linear(self, **full: torch.Tensor | None) -> nn.Linear:
        """A plain frozen ``nn.Linear`` holding the merged weight (``full``: gathered ``weight``,
        ``blocks`` and ``bias`` standing in for partitioned ones)."""
        bias = full.pop("bias", None)
        bias = self.bias if bias is None else bias
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=float_dtype(self),
        )
        linear.weight = nn.Parameter(self.merged_weight(**full), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(linear.weight.dtype, copy=True), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, "
            f"num_blocks={self.num_blocks}"
        )


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself with a float weight: the layers ``SparseLinear`` computes fused.

    A ZeRO-3 partitioned weight is still a plain Parameter; a quantized one (bitsandbytes'
    ``Params4bit``/``Int8Params``, a torchao tensor subclass) is not."""
    return type(module) is nn.Linear and type(module.weight) in (nn.Parameter, torch.Tensor)


def register_derived_index(module: nn.Module) -> None:
    """Index tensors the autograd functions need, derived from ``module.block_index``, as
    non-persistent buffers of the module (they follow it across devices)."""
    index = module.block_index
    saved_cols, col_slot = torch.unique(index[:, 1], sorted=True, return_inverse=True)
    module.register_buffer("_rows", index[:, 0].contiguous(), persistent=False)
    module.register_buffer("_cols", index[:, 1].contiguous(), persistent=False)
    module.register_buffer("_saved_cols", saved_cols, persistent=False)
    module.register_buffer("_col_slot", col_slot, persistent=False)
    # Blocks are stored column-major, so with one block per column-block the saved columns
    # already line up with the blocks and need no second gather.
    module._cols_distinct = len(saved_cols) == len(index)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, holder: nn.Module, *, save_input: bool
) -> torch.Tensor:
    """``x @ (W + D).T + b`` with gradients for ``x`` and the blocks only.

    ``holder`` holds ``blocks``, ``block_size``, ``block_index`` and the index buffers of
    ``register_derived_index`` (a ``SparseLinear``, or an adapter's blocks beside a base layer)."""
    x = _autocast_input(x)
    leading, (out_features, in_features) = x.shape[:-1], weight_shape(weight)
    num_blocks, l = holder.block_index.shape[0], holder.block_size  # also while blocks are partitioned
    # Autocast is off inside so the function sees exactly the dtypes chosen above.
    with torch.autocast(x.device.type, enabled=False):
        y = _SparseBlockLinear.apply(
            x.reshape(-1, in_features),
            weight,
            bias,
            holder.blocks,
            holder._rows,
            holder._cols,
            holder._saved_cols,
            holder._col_slot,
            _Plan(
                cols_distinct=holder._cols_distinct,
                save_input=save_input,
                merged=num_blocks * l**2 >= MERGE_AREA * in_features * out_features,
            ),
        )
    return y.view(*leading, out_features)


def add_block_products(x: torch.Tensor, y: torch.Tensor, holder: nn.Module) -> torch.Tensor:
    """``y`` (a base layer's output for ``x``) plus the blocks' products, scattered to their rows;
    gradients for ``x`` (the blocks' share), ``y`` (passed through) and the blocks."""
    x = _autocast_input(x)
    y2d = y.reshape(-1, y.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        out = _AddBlockProducts.apply(
            x.reshape(-1, x.shape[-1]).to(y.dtype),
            y2d,
            holder.blocks,
            holder._rows,
            holder._cols,
            holder._saved_cols,
            holder._col_slot,
            holder._cols_distinct,
        )
    return out.view(y.shape)


MERGED_FLAG = "weight_includes_blocks"
"""State-dict key (after the module's prefix) marking a ``weight`` saved as ``W + D``."""


def merge_blocks_into(state_dict: dict, prefix: str, shape: torch.Size) -> None:
    """Replace ``prefix + "weight"`` by ``W + D`` in a state dict and flag it, in place.

    Left alone when already flagged, when an entry is missing or is a partition or ``DTensor``
    rather than a full plain tensor, or when the weight is not of the full ``shape``.
    """
    if prefix + MERGED_FLAG in state_dict:
        return
    weight, blocks, index = (state_dict.get(prefix + k) for k in ("weight", "blocks", "block_index"))
    plain = all(
        type(t) is torch.Tensor for t in (weight, blocks, index)
    )  # not missing, a partition or DTensor
    if not plain or weight.shape != shape or blocks.shape[0] != len(index):
        return
    state_dict[prefix + "weight"] = scatter_blocks(
        weight, index.to(weight.device), blocks.to(weight.device), add=True
    )
    state_dict[prefix + MERGED_FLAG] = torch.ones((), dtype=torch.bool)


def _merge_weight_on_save(module: SparseLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module.merge_on_save:
        merge_blocks_into(state_dict, prefix, weight_shape(module.weight))


def _unmerge_weight_on_load(module: SparseLinear, state_dict: dict, prefix: str, *args) -> None:
    if state_dict.pop(prefix + MERGED_FLAG, None) is None:
        return
    weight, blocks, index = (state_dict.get(prefix + k) for k in ("weight", "blocks", "block_index"))
    if weight is None or blocks is None or index is None:
        return
    # Loading into the base it was saved from (a resume): keep that base bit for bit, since
    # W + D - D may differ from W in the last bit. Otherwise take the blocks out of the weight.
    base = module.weight.detach()
    if type(base) is torch.Tensor and not base.is_meta and base.shape == weight.shape:
        remerged = scatter_blocks(base.to(weight.device, weight.dtype), index, blocks, add=True)
        if torch.equal(remerged, weight):
            state_dict[prefix + "weight"] = base
            return
    state_dict[prefix + "weight"] = scatter_blocks(weight, index, -blocks, add=True)


def _checked_index(block_index: torch.Tensor, n_rows: int, n_cols: int, *, name: str) -> torch.Tensor:
    """Validate block coordinates; return them column-major sorted, ``[nb, 2]`` int64 on CPU."""
    index = torch.as_tensor(block_index).detach().to("cpu", torch.int64)
    if index.ndim != 2 or index.shape[1] != 2:
        raise ValueError(
            f"Block index for '{name}' must have shape [num_blocks, 2], got {tuple(index.shape)}."
        )
    if len(index):
        bad = (index[:, 0] < 0) | (index[:, 0] >= n_rows) | (index[:, 1] < 0) | (index[:, 1] >= n_cols)
        if bad.any():
            row, col = index[bad][0].tolist()
            raise ValueError(
                f"Block ({row}, {col}) of '{name}' is outside its {n_rows} x {n_cols} block grid."
            )
    index = sort_column_major(index)
    if len(index) > 1 and (index[1:] == index[:-1]).all(dim=1).any():
        raise ValueError(f"Block index for '{name}' lists the same block more than once.")
    return index
