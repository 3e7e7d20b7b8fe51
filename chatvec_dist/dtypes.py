"""The safetensors dtype names, and how they map to torch."""
from __future__ import annotations

import torch

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
ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in TORCH_DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Output dtypes a merge may round to, by the names users type.
OUTPUT_DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
CONFIG_NAMES: dict[str, str] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def compute_dtype(dtypes: list[str]) -> torch.dtype:
    """Float32 where every operand and the result are 16-bit floats (exact for them), else float64."""
    return torch.float32 if all(ITEMSIZE[d] <= 2 for d in dtypes) else torch.float64
