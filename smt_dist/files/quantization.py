"""How the job loads a quantized frozen base: the options, checked, and transformers' config for them.

``--load_in_4bit`` (bitsandbytes NF4 or FP4, QLoRA's base), ``--load_in_8bit`` (bitsandbytes
LLM.int8) and ``--torchao int8`` (torchao's int8 weight-only) quantize the base's linears as they
are loaded; embeddings, norms and the LM head stay in the job's dtype, and the blocks train in it.
The adapter is the same file as on a float base, and its fingerprint is read from the base's
safetensors (the float weights), so it merges into them exactly.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from smt_dist.files.dtypes import FLOAT_DTYPES

QUANT_TYPES = ("nf4", "fp4")
TORCHAO = ("int8",)


@dataclass(frozen=True)
class Quantization:
    """One way of quantizing the base: ``kind`` is ``"4bit"``, ``"8bit"`` or ``"torchao-int8"``."""

    kind: str
    quant_type: str = "nf4"
    compute_dtype: str | None = None
    """The 4-bit layers' compute dtype (default: the job's)."""
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"--bnb_4bit_quant_type must be nf4 or fp4, got {self.quant_type!r}.")
        if self.compute_dtype is not None and self.compute_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"--bnb_4bit_compute_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.compute_dtype!r}."
            )
        library = "torchao" if self.kind.startswith("torchao") else "bitsandbytes"
        if importlib.util.find_spec(library) is None:
            raise ValueError(f"A {self.describe()} base needs {library}: pip install {library}.")

    def describe(self) -> str:
        """Words for logs and messages: ``"4-bit nf4"``, ``"8-bit"``, ``"torchao int8"``."""
        return {"4bit": f"4-bit {self.quant_type}", "8bit": "8-bit", "torchao-int8": "torchao int8"}[
            self.kind
        ]

    def transformers_config(self, dtype: torch.dtype):
        """The ``quantization_config`` for ``from_pretrained`` (``dtype``: the job's)."""
        if self.kind == "torchao-int8":
            from torchao.quantization import Int8WeightOnlyConfig
            from transformers import TorchAoConfig

            return TorchAoConfig(Int8WeightOnlyConfig())
        from transformers import BitsAndBytesConfig

        if self.kind == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = FLOAT_DTYPES[self.compute_dtype] if self.compute_dtype else dtype
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_quant_storage=torch.uint8,
        )


def quantization_from_options(
    *,
    load_in_4bit: bool,
    load_in_8bit: bool,
    torchao: str | None,
    quant_type: str,
    compute_dtype: str | None,
    double_quant: bool,
) -> Quantization | None:
    """The quantization the job's options ask for, or ``None``; ``ValueError`` for a bad mix."""
    chosen = [
        name
        for name, on in (
            ("--load_in_4bit", load_in_4bit),
            ("--load_in_8bit", load_in_8bit),
            ("--torchao", torchao is not None),
        )
        if on
    ]
    if len(chosen) > 1:
        raise ValueError(f"Give one way of quantizing the base, not {' and '.join(chosen)}.")
    four_bit_options = quant_type != "nf4" or compute_dtype is not None or double_quant
    if four_bit_options and not load_in_4bit:
        raise ValueError("The --bnb_4bit_* options need --load_in_4bit.")
    if torchao is not None and torchao not in TORCHAO:
        raise ValueError(f"--torchao must be {' or '.join(TORCHAO)} (int4 needs CUDA), got {torchao!r}.")
    if load_in_4bit:
        return Quantization("4bit", quant_type, compute_dtype, double_quant)
    if load_in_8bit:
        return Quantization("8bit")
    if torchao is not None:
        return Quantization("torchao-int8")
    return None
