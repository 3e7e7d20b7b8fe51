"""A worker's step for a block-scaled FP8 weight: its operands paired with their scales, the new scales kept for
the scale tensor that follows the weight in the same unit."""

from __future__ import annotations

from typing import Protocol

import torch

from ..kernels.fp8 import Blocked, Operand
from ..kernels.stats import Stats
from ..planning.fp8 import SCALE_SUFFIX, is_fp8, scale_shape
from ..planning.planner import PlannedTensor, Src
from ..term import Term


class Fp8Compute(Protocol):
    def combine_fp8(
        self, out: torch.Tensor, out_scale: torch.Tensor | None, cp: Operand | None, terms: list[Term], cols: int
    ) -> Stats: ...


def combine_blocked(
    compute: Fp8Compute, t: PlannedTensor, inputs: dict[Src, torch.Tensor], out: torch.Tensor
) -> tuple[Stats, tuple[str, torch.Tensor] | None]:
    """Combine the whole weight `t` into `out` (host); for an FP8 output also (its scale tensor's name, the new
    scales)."""

    def operand(src: Src) -> Operand:
        values = inputs[src][: t.numel]
        return Blocked(values, inputs[src.scale]) if src.scale is not None else values

    cp = operand(t.cp) if t.cp is not None else None
    terms = [Term(a, operand(p), operand(m) if m is not None else None) for a, p, m in t.terms]
    rows, cols = scale_shape(t.shape)
    out_scale = torch.empty(rows * cols, dtype=torch.float32) if is_fp8(t.out_dtype) else None
    stats = compute.combine_fp8(out, out_scale, cp, terms, t.shape[-1])
    return stats, (t.name + SCALE_SUFFIX, out_scale) if out_scale is not None else None
