"""The safetensors dtype names as torch dtypes, and the dtype the arithmetic runs in (workers only)."""

from __future__ import annotations

import torch

from .dtypes import ITEMSIZE

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def compute_dtype(dtypes: list[str]) -> torch.dtype:
    """Float32 where every operand and the result are 16-bit floats (exact for them), else float64."""
    return torch.float32 if all(ITEMSIZE[d] <= 2 for d in dtypes) else torch.float64
