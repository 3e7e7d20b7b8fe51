"""DARE's mask and TIES' trim, sign election and mix on CPU tensors, a chunk at a time (the CPU kernel's helpers;
the Triton kernel computes the same bits). Definitions: planning/sparsity.py and docs/exactness.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..planning.sparsity import M32, TermDare, TiesPlan, fmix32
from ..term import Term
from .stats import Stats

_C1, _C2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)  # fmix32's multipliers


@dataclass(frozen=True)
class Sparse:
    """What a kernel call needs for DARE and TIES: the flat index of its element 0 within the tensor, each term's
    DARE (empty: none) and the tensor's TIES (its thresholds found)."""

    first: int
    dare: tuple[TermDare | None, ...] = ()
    ties: TiesPlan | None = None

    def term_dare(self, i: int) -> TermDare | None:
        return self.dare[i] if self.dare else None

    def alpha(self, i: int, alpha: float) -> float:
        """Term i's scale: alpha, or alpha/density (in float64) under DARE."""
        d = self.term_dare(i)
        return alpha if d is None else alpha / d.density


def _fmix(h: np.ndarray, tmp: np.ndarray) -> None:
    """`fmix32` in place on uint32 lanes (numpy's uint32 products wrap: 7× faster here than torch on int64)."""
    for shift, factor in ((16, _C1), (13, _C2), (16, None)):
        np.right_shift(h, shift, out=tmp)
        h ^= tmp
        if factor is not None:
            h *= factor


def keep_mask(d: TermDare, first: int, n: int) -> torch.Tensor:
    """Whether DARE keeps each of elements [first, first + n) of the tensor (`planning.sparsity.keep_bits`)."""
    keep = np.empty(n, dtype=bool)
    at = 0
    while at < n:  # one stretch per value of the index's high word
        lo = (first + at) & M32
        size = min(n - at, 2**32 - lo)
        h = np.arange(lo, lo + size, dtype=np.uint32)
        tmp = np.empty_like(h)
        h ^= np.uint32(fmix32(((first + at) >> 32) ^ d.salt))
        _fmix(h, tmp)
        h ^= np.uint32(d.salt)
        _fmix(h, tmp)
        np.less(h, d.threshold, out=keep[at : at + size])
        at += size
    return torch.from_numpy(keep)


def magnitude_bits(d: torch.Tensor) -> torch.Tensor:
    """|d| rounded to float32, as its (monotone, sign-free) bit pattern in int32: what TIES trims by."""
    return d.abs().to(torch.float32).view(torch.int32)


def term_delta(
    dst: torch.Tensor, term: Term, i: int, sparse: Sparse | None, s: int, e: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dst = (plus − minus)[s:e] in dst's dtype, DARE's dropped elements zeroed (unscaled); returns it and DARE's
    mask (None without DARE)."""
    _, plus, minus = term
    dst.copy_(plus[s:e])
    if minus is not None:
        dst.sub_(minus[s:e])
    d = sparse.term_dare(i) if sparse is not None else None
    if d is None:
        return dst, None
    keep = keep_mask(d, sparse.first + s, e - s)  # type: ignore[union-attr]
    return dst.masked_fill_(~keep, 0.0), keep


def ties_delta(
    acc: torch.Tensor, bufs: Sequence[torch.Tensor], terms: Sequence[Term], sparse: Sparse, s: int, e: int, stats: Stats
) -> None:
    """acc = TIES' mixed delta over elements [s, e): each term's delta (after DARE) trimmed to |Δ| ≥ its threshold
    and scaled, the sign elected by their sum (≥ 0: positive), the agreeing entries summed in term order and,
    where normalizing, divided by the sum of their alphas (1 where none agrees). `bufs`: one buffer per term, and
    one more. Entries are dropped by multiplying by 0 or 1, as mergekit does (a dropped −x is −0, a dropped Inf
    NaN); the Triton kernel does the same."""
    ties = sparse.ties
    assert ties is not None and ties.thresholds is not None
    weighted, sign = [], bufs[len(terms)]
    for i, term in enumerate(terms):
        d, dare = term_delta(bufs[i], term, i, sparse, s, e)
        kept = magnitude_bits(d) >= ties.thresholds[i]
        if dare is not None:
            kept &= dare
        stats.kept[i] += int(kept.sum())
        d.mul_(kept)
        alpha = sparse.alpha(i, term[0])
        if alpha != 1.0:
            d.mul_(alpha)
        weighted.append(d)
    acc.copy_(weighted[0])
    for d in weighted[1:]:
        acc.add_(d)
    sign.copy_(acc >= 0).mul_(2).sub_(1)  # the elected sign: +1 where the sum is ≥ 0, else −1
    divisor = torch.zeros_like(acc) if ties.normalize else None
    for i, d in enumerate(weighted):
        agree = torch.mul(d, sign) > 0  # d's sign is the elected one (never for 0 or NaN)
        stats.agree += int(agree.sum())
        stats.signed += int((d != 0).sum())
        d.mul_(agree)
        if i == 0:
            acc.copy_(d)
        else:
            acc.add_(d)
        if divisor is not None:
            divisor.add_(agree.to(acc.dtype).mul_(terms[i][0]))
    if divisor is not None:
        divisor.add_(divisor == 0)  # 1 where no vector agrees
        acc.div_(divisor)
