"""The float64 reference: what every kernel must reproduce after rounding to the output dtype (as torch converts
float64: through float32 to a 16-bit dtype, see docs/exactness.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..term import Term


def reference(
    cp: torch.Tensor | None, terms: Sequence[Term], out_dtype: torch.dtype, merge_elems: int | None = None
) -> torch.Tensor:
    """`cp + Σ alpha·(plus − minus)` in float64 on the first `merge_elems` flat elements, then rounded."""
    base = cp.double().flatten() if cp is not None else None
    numel = base.numel() if base is not None else Term(*terms[0]).plus.numel()
    k = numel if merge_elems is None else merge_elems
    delta = None  # not zeros: 0 + (−0) would be +0, where the formula gives −0
    for alpha, plus, minus in terms:
        d = plus.double().flatten()[:k]
        if minus is not None:
            d = d - minus.double().flatten()[:k]
        delta = alpha * d if delta is None else delta + alpha * d
    out = base.clone() if base is not None else torch.zeros(numel, dtype=torch.float64)
    if delta is not None:
        out[:k] = delta if base is None else out[:k] + delta
    return out.to(out_dtype)
