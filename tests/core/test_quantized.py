"""SparseLinear over quantized base layers (bitsandbytes 4-bit and 8-bit, torchao int8).

The reference is dense autograd on ``W_ref = dequantized(base) + D``, built independently of the
layer's block products: the base computes with its dequantized weight, so the two must agree to
fp32 rounding, and the block gradients (computed from the same ``dY`` and ``X``) exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from smt_dist.core.blocks import weight_shape
from smt_dist.core.config import SMTConfig
from smt_dist.core.layer import SparseLinear, is_plain_linear
from smt_dist.core.quantized import dequantized, error_bounds, float_dtype, quantization
from smt_dist.core.selection import BlockSelection
from smt_dist.core.surgery import apply_smt, merge_smt

bnb = pytest.importorskip("bitsandbytes")
IN, OUT, L = 64, 96, 16
INDEX = torch.tensor([[0, 1], [2, 1], [5, 3], [1, 0], [4, 2]])  # two blocks share column-block 1
KINDS = ["nf4", "fp4", "int8", "int8-outliers", "torchao-int8"]
# Forward and input gradient: 64-term fp32 dot products of values up to ~50, summed in another
# order than the dense reference's; measured 1.5e-5 at worst, 2^-23 * 64 * 50 = 4e-4 bounds it.
FP32_SUMS = dict(rtol=1e-5, atol=4e-4)


def float_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def quantized(kind: str, linear: nn.Linear, device: str = "cpu") -> nn.Module:
    """``linear`` quantized as transformers' loaders do it."""
    if kind == "torchao-int8":
        torchao = pytest.importorskip("torchao.quantization")
        holder = nn.Sequential(nn.Linear(IN, OUT, device=device))
        holder[0].load_state_dict(linear.state_dict())
        torchao.quantize_(holder, torchao.Int8WeightOnlyConfig())
        return holder[0]
    if kind in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, quant_type=kind)
    else:  # LLM.int8; with a threshold, inputs above it take the outlier path
        threshold = 6.0 if kind == "int8-outliers" else 0.0
        layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)


def sparse_over(base: nn.Module) -> SparseLinear:
    layer = SparseLinear.from_linear(base, INDEX, block_size=L, name="q")
    with torch.no_grad():
        layer.blocks.copy_(torch.randn(layer.blocks.shape, generator=torch.Generator().manual_seed(3)))
    return layer


def dense_reference(layer: SparseLinear, x: torch.Tensor, grad_y: torch.Tensor):
    """Output, input gradient and block gradients of ``x @ (dequantized W + D).T + b``."""
    weight = dequantized(layer.base_layer).float()
    grid = weight.view(OUT // L, L, IN // L, L).permute(0, 2, 1, 3)
    index = layer.block_index.cpu()
    grid[index[:, 0], index[:, 1]] += layer.blocks.detach().float()
    weight.requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    y = x @ weight.T + layer.bias.detach()
    y.backward(grad_y)
    grad_blocks = weight.grad.view(OUT // L, L, IN // L, L).permute(0, 2, 1, 3)[index[:, 0], index[:, 1]]
    return y.detach(), x.grad, grad_blocks


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_gradients_equal_dense_autograd_on_the_dequantized_weight(kind):
    base = quantized(kind, float_linear())
    layer = sparse_over(base)
    assert not is_plain_linear(base) and layer.base_layer is base
    assert layer.blocks.dtype == torch.float32 and layer.weight is base.weight
    x = (3 * torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    grad_y = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' note that int8 casts its inputs
        y = layer(x)
        y.backward(grad_y)
    y_ref, grad_x_ref, grad_blocks_ref = dense_reference(layer, x, grad_y)
    torch.testing.assert_close(y, y_ref, **FP32_SUMS)
    torch.testing.assert_close(x.grad, grad_x_ref, **FP32_SUMS)
    # dD = dY_rows^T X_cols over 10 tokens on both sides: the same 10-term sums
    torch.testing.assert_close(layer.blocks.grad, grad_blocks_ref, rtol=1e-6, atol=1e-5)
    assert all(p.grad is None for p in base.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_shape_kind_and_error_bound_of_each_quantized_layer(kind):
    linear = float_linear()
    base = quantized(kind, linear)
    assert weight_shape(base.weight) == (OUT, IN)  # 4-bit packs two values a byte: [OUT * IN / 2, 1]
    assert quantization(base) == {"nf4": "nf4", "fp4": "fp4"}.get(
        kind, "int8" if "torchao" not in kind else "torchao:Int8Tensor"
    )
    assert float_dtype(base) == torch.float32
    assert quantization(linear) is None and is_plain_linear(linear)
    values = dequantized(base)
    positions = torch.arange(OUT * IN)
    error = (values.float() - linear.weight.detach()).abs().reshape(-1)
    bounds = error_bounds(base, values, positions)
    assert (error <= bounds).all()  # the bound holds for every element
    assert error.max() > 0  # and the layer is really quantized
    assert (error_bounds(linear, linear.weight, positions) == 0).all()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_apply_smt_on_a_quantized_model_trains_and_merges_to_dense_dequantized_plus_blocks(kind):
    model = nn.Sequential(quantized(kind, float_linear()), nn.ReLU(), nn.Linear(OUT, 8))
    selection = BlockSelection(block_size=L, blocks={"0": INDEX})
    apply_smt(model, selection, SMTConfig(block_size=L, target_modules=["0"], num_blocks=5))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.blocks"]
    x = torch.randn(4, IN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x).sum().backward()
        torch.optim.SGD([model[0].blocks], lr=0.1).step()
        expected = dequantized(model[0].base_layer).float()
        grid = expected.view(OUT // L, L, IN // L, L).permute(0, 2, 1, 3)
        grid[model[0].block_index[:, 0], model[0].block_index[:, 1]] += model[0].blocks.detach()
        before = model(x)
    with pytest.warns(UserWarning, match=r"dense float layers of dequantized W \+ D"):
        merge_smt(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, expected)  # dequantized W + D, one fp32 addition each
    torch.testing.assert_close(model(x), before, **FP32_SUMS)


def test_an_eval_mode_forward_leaves_a_4bit_base_as_it_was():
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval-mode,
    no-grad forward and rounds its scales to bf16; under SMT the base must not change."""
    layer = sparse_over(quantized("nf4", float_linear()))
    x = torch.randn(3, IN)
    trained = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(evaluated, trained)


def test_a_weight_repacked_before_smt_saw_it_is_one_clear_error():
    base = quantized("nf4", float_linear())
    base.weight.quant_state.packing_format_for_cpu = True  # what bitsandbytes' eval path leaves
    with pytest.raises(ValueError, match="repacked for bitsandbytes' CPU inference kernel"):
        dequantized(base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' CUDA kernels need a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_cuda_kernels_match_the_dense_reference(kind):
    base = quantized(kind, float_linear(), device="cuda")
    layer = sparse_over(base).cuda()
    x = torch.randn(2, 5, IN, device="cuda", requires_grad=True)
    grad_y = torch.randn(2, 5, OUT, device="cuda")
    layer(x).backward(grad_y)
    y_ref, grad_x_ref, grad_blocks_ref = dense_reference(layer, x, grad_y)
    # LLM.int8 quantizes the activations too on CUDA (one scale per row, error 1/254 of the row's
    # largest value); 4-bit computes with the dequantized weight in the compute dtype.
    tolerance = dict(rtol=2e-2, atol=2e-1) if kind == "int8" else FP32_SUMS
    torch.testing.assert_close(layer(x), y_ref, **tolerance)
    torch.testing.assert_close(x.grad, grad_x_ref, **tolerance)
    torch.testing.assert_close(layer.blocks.grad, grad_blocks_ref, rtol=1e-5, atol=1e-4)
