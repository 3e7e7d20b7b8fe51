"""The safetensors dtype names: sizes, which are floats, what users call them. No torch here: the driver
plans and audits without importing it."""

from __future__ import annotations

ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Output dtypes a merge may round to, by the names users type (float64: an extracted vector that keeps every bit of
# the float64 difference of float32 models, see docs/exactness.md).
OUTPUT_DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
CONFIG_NAMES: dict[str, str] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES
