"""The one table of dtypes the files speak: names in JSON and on the command line, codes in safetensors."""

from __future__ import annotations

import torch

FLOAT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
"""Floating dtypes by name (``str(dtype)`` without ``torch.``): what weights and blocks may be."""

_SAFETENSORS_CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def safetensors_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"BF16"``); fp32 for codes torch lacks."""
    return _SAFETENSORS_CODES.get(code, torch.float32)
