"""Quantized base layers as the method sees them: what they are, their float dtype, their weight.

SMT's blocks are small float deltas beside a frozen base, and the base only has to run its own
forward and input gradient, so any frozen linear can carry them: a bitsandbytes ``Linear4bit``
(NF4 or FP4, its weight packed two values to a byte, the real shape in ``quant_state``), a
``Linear8bitLt`` (int8 rows with one scale each, moved from the weight to ``module.state`` at its
first forward) or an ``nn.Linear`` whose weight torchao made a quantized tensor subclass. What the
method needs from them is read from attributes; bitsandbytes is imported only to dequantize its
own weights, so the method runs with neither library installed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

# Loggers that report optional kernels missing, once per process, whenever transformers or peft
# import torchao or bitsandbytes: torchao's CUDA-only extensions on a CPU build of torch (and the
# deprecation notices its enums raise in torch's pytree), bitsandbytes' CPU kernel from the
# ``kernels`` package. None of them changes what is computed; a job's bad input must stay one
# sentence on stderr.
OPTIONAL_KERNEL_LOGGERS = ("torchao", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree")


def quiet_optional_kernels() -> None:
    """Show only errors from ``OPTIONAL_KERNEL_LOGGERS`` (before those libraries are imported)."""
    for name in OPTIONAL_KERNEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quantization(module: nn.Module) -> str | None:
    """The kind of quantized weight a linear layer holds (``"nf4"``, ``"fp4"``, ``"int8"``,
    ``"torchao:<TensorType>"``), or ``None`` for a float weight."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return str(state.quant_type)
    if type(weight).__name__ == "Int8Params":
        return "int8"
    if type(weight).__module__.startswith("torchao"):
        return f"torchao:{type(weight).__name__}"
    return None


def keep_layout(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer of ``model`` in its usual packed layout.

    On a CPU with AVX512-BF16, an eval-mode forward of a ``Linear4bit`` repacks its weight for
    bitsandbytes' inference kernel and rounds its scales to bf16, in place: the layer then
    computes a slightly different function, and its weight can no longer be dequantized (the
    inverse bitsandbytes offers is best-effort). So a validation pass would change the base
    under training. This switches that repacking off (``support_avx512bf16_for_cpu``); GPUs
    never take that path."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def float_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a quantized layer was made from (its blocks' default dtype)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return state.dtype
    if weight.dtype.is_floating_point:  # a float weight, or torchao's subclass reporting its original dtype
        return weight.dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None else torch.float32


@torch.no_grad()
def dequantized(module: nn.Module) -> torch.Tensor:
    """The float ``[out, in]`` weight a quantized layer computes with (a new tensor).

    For a float weight this is the weight itself. A layer wrapping one (``base_layer``: a
    ``SparseLinear`` or a peft tuner layer) gives its base's."""
    module = getattr(module, "base_layer", module)
    weight, kind = module.weight, quantization(module)
    if kind is None:
        return weight.detach()
    if kind in ("nf4", "fp4"):
        import bitsandbytes.functional as bnb_functional

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                "A 4-bit layer's weight was repacked for bitsandbytes' CPU inference kernel (an "
                "eval-mode forward before SMT saw it), with its scales rounded to bf16; its float "
                "values can no longer be read. Reload the model and hand it to SMT before any "
                "eval-mode forward."
            )
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "int8":
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return (weight.data.float() * scales.float()[:, None] / 127).to(float_dtype(module))
    return weight.dequantize()


# |original - dequantized| <= BOUND * (absmax of the values quantized together): half the largest
# gap between neighbouring 4-bit levels is 0.139 for NF4 and 0.167 for FP4 (levels 2/3 and 1),
# with room for a double-quantized absmax (8 bits, about 1% of it); an int8 row's step is
# absmax / 127, and rounding errs by at most half a step, so a whole step leaves a factor 2.
_FOUR_BIT_BOUND = 0.2
_INT8_BOUND = 1 / 127


@torch.no_grad()
def error_bounds(module: nn.Module, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per flat position of ``weight`` (the layer's dequantized weight), a bound on how far the
    float weight it was quantized from may lie: fp32 on the CPU, zero for a float layer."""
    module = getattr(module, "base_layer", module)
    kind = quantization(module)
    positions = positions.to(weight.device)
    if kind is None:
        return torch.zeros(len(positions))
    flat = weight.detach().reshape(-1).float()
    state = getattr(module.weight, "quant_state", None)
    if state is not None:  # 4-bit: absmax of each run of ``blocksize`` consecutive elements
        group = positions // state.blocksize
        absmax = flat.view(-1, state.blocksize).abs().amax(dim=1)[group]
        return (_FOUR_BIT_BOUND * absmax).cpu()
    row = positions // weight.shape[1]  # int8 (bitsandbytes, torchao): one scale per row
    absmax = weight.detach().float().abs().amax(dim=1)[row]
    bound = _INT8_BOUND if "int8" in kind.lower() else _FOUR_BIT_BOUND
    return (bound * absmax).cpu()
