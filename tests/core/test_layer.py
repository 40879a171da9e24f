"""SparseLinear against dense autograd on the merged weight, masked to the selected blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from block_helpers import block_mask, gather_blocks
from torch import nn
from torch.utils.checkpoint import checkpoint

import smt_dist.core.layer as layer_module
from smt_dist import BlockSelection, SMTConfig, SparseLinear, apply_smt
from smt_dist.core.surgery import smt_modules

# fp32: both sides do the same products in a different summation order (dense matmul vs.
# matmul + block correction), so they agree to a few ulps of the largest term; 1e-5 relative.
FP32 = dict(rtol=1e-5, atol=1e-5)
# bf16 keeps 8 mantissa bits (relative step 2**-8 ~ 4e-3) and every output is rounded to it, so
# an element near a zero crossing has no meaningful elementwise relative error. bf16 results are
# therefore compared by their largest error relative to the reference's largest magnitude: 1e-2
# leaves room for the rounding of the inputs, the output and a few accumulations.
BF16_REL = 1e-2


def assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = (actual.float() - expected).abs().max()
    assert error <= BF16_REL * expected.abs().max(), (error, expected.abs().max())


def random_layer(out_f, in_f, l, nb, *, bias=True, seed=0, dtype=torch.float32) -> SparseLinear:
    generator = torch.Generator().manual_seed(seed)
    grid = (out_f // l) * (in_f // l)
    flat = torch.randperm(grid, generator=generator)[:nb]
    index = torch.stack([flat // (in_f // l), flat % (in_f // l)], dim=1)
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = SparseLinear.from_linear(linear, index, block_size=l, name="test")
    with torch.no_grad():
        layer.blocks.normal_(generator=generator)
    return layer


def dense_reference(layer: SparseLinear, x: torch.Tensor, grad_y: torch.Tensor, dtype=torch.float32):
    """Output, input gradient and block gradients from plain autograd on W + D."""
    weight = layer.merged_weight().to(dtype).requires_grad_(True)
    x_ref = x.detach().to(dtype).requires_grad_(True)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    y = F.linear(x_ref, weight, bias)
    y.backward(grad_y.to(dtype))
    mask = block_mask(tuple(weight.shape), layer.block_index, layer.block_size)
    if not mask.all():  # the masking below must actually drop something
        assert weight.grad[~mask].abs().sum() > 0
    return y, x_ref.grad, gather_blocks(weight.grad, layer.block_index, layer.block_size)


def assert_matches_dense_fp32(layer: SparseLinear, x: torch.Tensor, y: torch.Tensor) -> None:
    """Backpropagate a random gradient through ``y`` and compare everything with dense autograd."""
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_ref, gx_ref, gb_ref = dense_reference(layer, x, grad_y)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(x.grad, gx_ref, **FP32)
    torch.testing.assert_close(layer.blocks.grad, gb_ref, **FP32)


CASES = [
    # (out, in, l, nb, leading shape): square, non-square, GQA-like narrow out, 2-D/3-D/4-D.
    (64, 64, 16, 5, (7,)),
    (32, 96, 16, 4, (2, 9)),
    (96, 32, 8, 11, (2, 3, 5)),
    (48, 80, 16, 15, (3, 4)),
    (16, 16, 16, 1, (4,)),
]


@pytest.mark.parametrize("merge_area", [0.0, 2.0])  # every layer merged / none
@pytest.mark.parametrize("save_input", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("out_f", "in_f", "l", "nb", "lead"), CASES)
def test_matches_dense_autograd_fp32(out_f, in_f, l, nb, lead, bias, save_input, merge_area, monkeypatch):
    monkeypatch.setattr(layer_module, "MERGE_AREA", merge_area)
    layer = random_layer(out_f, in_f, l, nb, bias=bias, seed=out_f + in_f + nb)
    layer.save_input = save_input
    x = torch.randn(*lead, in_f, requires_grad=True)
    assert_matches_dense_fp32(layer, x, layer(x))
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


@pytest.mark.parametrize("merge_area", [0.0, 2.0])
def test_matches_dense_autograd_bf16(merge_area, monkeypatch):
    monkeypatch.setattr(layer_module, "MERGE_AREA", merge_area)
    layer = random_layer(64, 96, 16, 7, dtype=torch.bfloat16)
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert y.dtype == x.grad.dtype == layer.blocks.grad.dtype == torch.bfloat16
    y_ref, gx_ref, gb_ref = dense_reference(layer, x, grad_y)
    assert_close_bf16(y, y_ref)
    assert_close_bf16(x.grad, gx_ref)
    assert_close_bf16(layer.blocks.grad, gb_ref)


def test_autocast_bf16_keeps_fp32_grads():
    layer = random_layer(64, 64, 16, 6)
    x = torch.randn(4, 6, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert x.grad.dtype == torch.float32 and layer.blocks.grad.dtype == torch.float32
    y_ref, gx_ref, gb_ref = dense_reference(layer, x, grad_y.float())
    assert_close_bf16(y, y_ref)
    assert_close_bf16(x.grad, gx_ref)
    assert_close_bf16(layer.blocks.grad, gb_ref)


@pytest.mark.parametrize("save_input", [False, True])
def test_under_non_reentrant_checkpoint(save_input):
    layer = random_layer(48, 64, 16, 5)
    layer.save_input = save_input
    plain = copy.deepcopy(layer)
    x = torch.randn(2, 7, 64, requires_grad=True)
    y = checkpoint(lambda t: torch.tanh(layer(t)), x, use_reentrant=False)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    x2 = x.detach().clone().requires_grad_(True)
    torch.tanh(plain(x2)).backward(grad_y)
    torch.testing.assert_close(x.grad, x2.grad, **FP32)
    torch.testing.assert_close(layer.blocks.grad, plain.blocks.grad, **FP32)


def test_no_input_gradient_when_input_needs_none():
    layer = random_layer(32, 32, 8, 3)
    x = torch.randn(5, 32)
    layer(x).sum().backward()
    assert x.grad is None and layer.blocks.grad is not None


@pytest.mark.parametrize("merge_area", [0.0, 2.0])
def test_never_writes_the_frozen_weight(merge_area, monkeypatch):
    monkeypatch.setattr(layer_module, "MERGE_AREA", merge_area)
    layer = random_layer(32, 64, 16, 4)
    before = layer.weight.detach().clone()
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    with torch.no_grad():
        layer.blocks.add_(1.0)
    layer(x).sum().backward()
    layer.merged_weight()
    layer.to_linear()
    assert torch.equal(layer.weight, before)


def _saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages packed for backward, the module's own state excluded.

    Counted by storage, not by saved tensor: several modules keeping one input by reference
    hold its memory once.
    """
    state = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in state:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum()
    return sum(storages.values())


def test_saved_bytes_scale_with_distinct_column_blocks():
    tokens, l = 10, 16
    for in_f in (64, 256):
        for cols in ([0], [0, 1], [0, 1, 3]):
            # Several blocks per column-block: saved bytes must not grow with the block count.
            index = torch.tensor([[r, c] for c in cols for r in range(2)])
            layer = SparseLinear.from_linear(nn.Linear(in_f, 32), index, block_size=l)
            saved = _saved_activation_bytes(layer, torch.randn(tokens, in_f, requires_grad=True))
            assert saved == tokens * len(cols) * l * 4, (in_f, cols, saved)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    layer = random_layer(32, 48, 16, 4)
    x = torch.randn(2, 5, 48, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    assert_matches_dense_fp32(layer, x, compiled(x))


def test_block_size_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Module 'attn.k_proj' has in_features=100, which block size 32"):
        SparseLinear.from_linear(
            nn.Linear(100, 64), torch.tensor([[0, 0]]), block_size=32, name="attn.k_proj"
        )


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ([[0, 4]], r"Block \(0, 4\) of 'm' is outside its 2 x 4 block grid"),
        ([[1, 1], [1, 1]], "lists the same block more than once"),
        ([0, 1], r"must have shape \[num_blocks, 2\]"),
    ],
)
def test_bad_block_index_is_a_clear_error(index, message):
    with pytest.raises(ValueError, match=message):
        SparseLinear.from_linear(nn.Linear(64, 32), torch.tensor(index), block_size=16, name="m")


def test_trainable_base_weight_is_refused():
    layer = random_layer(16, 16, 8, 1)
    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="SMT trains only its blocks"):
        layer(torch.randn(2, 16))


class _Attention(nn.Module):
    """q, k and v reading one input, as in a decoder layer (GQA: k and v are narrower)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32)

    def forward(self, x):
        return self.q_proj(x).sum() + self.k_proj(x).sum() + self.v_proj(x).sum()


@pytest.mark.parametrize(
    ("columns", "shared"),
    [
        ({"q_proj": [0, 1, 2], "k_proj": [3], "v_proj": [0]}, True),  # coverage 3/4 + 1/4 + 1/4 >= 1
        ({"q_proj": [0], "k_proj": [1], "v_proj": [1]}, False),  # 3/4 of the input in copies
        ({"q_proj": [0, 1, 2, 3]}, True),  # alone, but reading every column
    ],
)
def test_siblings_keep_their_input_once_when_copies_would_cost_more(columns, shared):
    tokens, l = 10, 16
    model = nn.Sequential()
    model.add_module("attn", _Attention())
    reference = copy.deepcopy(model)
    config = SMTConfig(block_size=l, num_blocks=1, target_modules=("q_proj", "k_proj", "v_proj"))
    selection = BlockSelection(
        block_size=l,
        blocks={f"attn.{name}": torch.tensor([[0, c] for c in cols]) for name, cols in columns.items()},
    )
    apply_smt(model, selection, config)
    assert {m.save_input for m in smt_modules(model).values()} == {shared}
    x = torch.randn(tokens, 64, requires_grad=True)
    copies = sum(len(cols) for cols in columns.values()) * tokens * l * 4
    expected = tokens * 64 * 4 if shared else copies
    assert _saved_activation_bytes(model, x) == expected
    assert expected <= copies  # the rule never keeps more than the copies would
    # Where each module keeps its activation changes no value.
    model(x).backward()
    apply_smt(reference, selection, config)
    for module in smt_modules(reference).values():
        module.save_input = not shared
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    for (name, a), b in zip(smt_modules(model).items(), smt_modules(reference).values(), strict=True):
        assert torch.equal(a.blocks.grad, b.blocks.grad), name
