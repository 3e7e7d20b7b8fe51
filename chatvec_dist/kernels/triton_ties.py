"""TIES in one Triton launch (up to MAX_TERMS vectors, all held in registers): the CPU kernel's `ties_delta`
(kernels/sparse.py) element for element, in the same order of operations, then the merge kernel's `_finish`. The
same bits as the CPU kernel: no FMA contraction, the division correctly rounded (`div_rn`, not Triton's default
float32 division)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..term import Term
from .sparse import Sparse
from .triton_merge import (
    _LAUNCH,
    _OUT_KIND,
    _TL,
    BLOCK,
    MAX_TERMS,
    STATS,
    TritonScratch,
    _bits,
    _dare_keep,
    _finish,
    _load,
    launch_options,
)

ROW = STATS + MAX_TERMS + 2  # a program's partials: the stats, each vector's kept elements, agreeing, signed
_STATS, _ROW = tl.constexpr(STATS), tl.constexpr(ROW)


@triton.jit
def _trimmed(
    plus_ptr,
    minus_ptr,
    alpha_bits,
    salt,
    threshold,
    magnitude,
    index,
    offs,
    mask,
    HAS_MINUS: tl.constexpr,
    HAS_DARE: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """One vector's alpha·Δ, zero where DARE dropped it or |Δ| (as float32 bits) is below its threshold; and how
    many this program kept."""
    d = _load(plus_ptr, offs, mask, COMPUTE)
    if HAS_MINUS:
        d = d - _load(minus_ptr, offs, mask, COMPUTE)
    keep = mask
    if HAS_DARE:
        dare = _dare_keep(index, salt, threshold)
        d = tl.where(dare, d, 0.0)
        keep = keep & dare
    keep = keep & (tl.abs(d).to(tl.float32).to(tl.int32, bitcast=True) >= magnitude.to(tl.int32))
    d = d * keep.to(COMPUTE)  # as the CPU kernel (and mergekit) drop entries: times 0
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if alpha != 1.0:
        d = d * alpha.to(COMPUTE)
    return d, tl.sum(keep.to(tl.float64), axis=0)


@triton.jit
def _vote(w, positive, mixed, divisor, weight_bits, FIRST: tl.constexpr, COMPUTE: tl.constexpr):
    """Add one vector's agreeing entry to the mix and its alpha to the divisor; 1 where it agrees."""
    agree = tl.where(positive, w > 0, w < 0)
    entry = w * agree.to(COMPUTE)
    if FIRST:
        mixed = entry
    else:
        mixed = mixed + entry
    divisor = divisor + tl.where(agree, weight_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE), 0.0)
    return mixed, divisor, tl.sum(agree.to(tl.float64), axis=0), tl.sum((w != 0).to(tl.float64), axis=0)


@triton.jit(
    do_not_specialize=[f"{x}{i}" for x in "abstg" for i in range(4)] + ["first"]  # numbers, not shapes
)
def _ties_kernel(
    out_ptr,
    cp_ptr,
    partials_ptr,
    p0,
    m0,
    a0,
    b0,
    s0,
    t0,
    g0,
    p1,
    m1,
    a1,
    b1,
    s1,
    t1,
    g1,
    p2,
    m2,
    a2,
    b2,
    s2,
    t2,
    g2,
    p3,
    m3,
    a3,
    b3,
    s3,
    t3,
    g3,
    n,
    first,
    N_TERMS: tl.constexpr,
    MINUS: tl.constexpr,
    DARE: tl.constexpr,
    HAS_CP: tl.constexpr,
    NORMALIZE: tl.constexpr,
    COMPUTE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per vector: a (scale), b (alpha: the divisor's), s/t (DARE's salt and threshold), g (magnitude threshold)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    index = first.to(tl.int64) + offs
    row = partials_ptr + pid * _ROW
    zero = tl.zeros([BLOCK], dtype=COMPUTE)
    w1, w2, w3 = zero, zero, zero
    w0, kept = _trimmed(p0, m0, a0, s0, t0, g0, index, offs, mask, (MINUS & 1) != 0, (DARE & 1) != 0, COMPUTE)
    tl.store(row + _STATS, kept)
    total = w0
    if N_TERMS > 1:
        w1, kept = _trimmed(p1, m1, a1, s1, t1, g1, index, offs, mask, (MINUS & 2) != 0, (DARE & 2) != 0, COMPUTE)
        tl.store(row + _STATS + 1, kept)
        total = total + w1
    if N_TERMS > 2:
        w2, kept = _trimmed(p2, m2, a2, s2, t2, g2, index, offs, mask, (MINUS & 4) != 0, (DARE & 4) != 0, COMPUTE)
        tl.store(row + _STATS + 2, kept)
        total = total + w2
    if N_TERMS > 3:
        w3, kept = _trimmed(p3, m3, a3, s3, t3, g3, index, offs, mask, (MINUS & 8) != 0, (DARE & 8) != 0, COMPUTE)
        tl.store(row + _STATS + 3, kept)
        total = total + w3
    positive = total >= 0
    mixed, divisor, agree, signed = _vote(w0, positive, zero, zero, b0, True, COMPUTE)
    if N_TERMS > 1:
        mixed, divisor, a, s = _vote(w1, positive, mixed, divisor, b1, False, COMPUTE)
        agree, signed = agree + a, signed + s
    if N_TERMS > 2:
        mixed, divisor, a, s = _vote(w2, positive, mixed, divisor, b2, False, COMPUTE)
        agree, signed = agree + a, signed + s
    if N_TERMS > 3:
        mixed, divisor, a, s = _vote(w3, positive, mixed, divisor, b3, False, COMPUTE)
        agree, signed = agree + a, signed + s
    tl.store(row + _STATS + 4, agree)
    tl.store(row + _STATS + 5, signed)
    if NORMALIZE:
        divisor = tl.where(divisor == 0, 1.0, divisor).to(COMPUTE)
        if tl.float32 == COMPUTE:
            mixed = tl.math.div_rn(mixed, divisor)
        else:
            mixed = mixed / divisor
    _finish(mixed, out_ptr, cp_ptr, row, offs, mask, True, HAS_CP, COMPUTE, OUT_KIND)


def ties_launch(
    out: torch.Tensor, cp: torch.Tensor | None, terms: Sequence[Term], compute: torch.dtype, partials, sparse: Sparse
) -> tuple[list, dict]:
    """The kernel's one launch: (positional arguments, constexprs)."""
    ties = sparse.ties
    assert ties is not None and ties.thresholds is not None and 0 < len(terms) <= MAX_TERMS
    args: list[object] = [out, cp if cp is not None else out, partials]
    minus_bits = dare_bits = 0
    for i in range(MAX_TERMS):
        if i < len(terms):
            alpha, plus, minus = terms[i]
            dare = sparse.term_dare(i)
            salt, threshold = (dare.salt, dare.threshold) if dare is not None else (0, 0)
            scale = _bits(sparse.alpha(i, alpha))
            args += [plus, minus if minus is not None else plus, scale, _bits(alpha), salt, threshold]
            args.append(ties.thresholds[i])
            minus_bits |= (minus is not None) << i
            dare_bits |= (dare is not None) << i
        else:
            args += [out, out, _bits(1.0), _bits(1.0), 0, 0, 0]
    constexprs = dict(
        N_TERMS=len(terms),
        MINUS=minus_bits,
        DARE=dare_bits,
        HAS_CP=cp is not None,
        NORMALIZE=ties.normalize,
        COMPUTE=_TL[compute],
        OUT_KIND=_OUT_KIND[out.dtype],
        BLOCK=BLOCK,
    )
    return args + [out.numel(), sparse.first], constexprs


def ties_triton(
    out: torch.Tensor,
    cp: torch.Tensor | None,
    terms: Sequence[Term],
    compute: torch.dtype,
    stats: torch.Tensor,
    scratch: TritonScratch,
    sparse: Sparse,
) -> None:
    """The CPU kernel's TIES on device tensors; adds [cp², Δ², (out−cp)², NaN, Inf, kept per vector…, agreeing,
    signed] into `stats` (float64, 7 + len(terms) values)."""
    n = out.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK),)
    partials = scratch.get("ties_partials", grid[0] * ROW, torch.float64, out.device)
    args, constexprs = ties_launch(out, cp, terms, compute, partials, sparse)
    with _LAUNCH:
        _ties_kernel[grid](*args, **constexprs, **launch_options())
    rows = partials.view(grid[0], ROW)
    k = len(terms)
    stats[: STATS + k] += rows[:, : STATS + k].sum(0)
    stats[STATS + k : STATS + k + 2] += rows[:, STATS + MAX_TERMS :].sum(0)
