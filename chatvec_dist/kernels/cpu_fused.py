"""The fused CPU kernel (numba): `out = round(cp + Σ alpha·(plus − minus))` and its stats in one pass over memory,
for the common case, every operand and the output bfloat16 (computed in float32) or float32 (computed in float64).
The same operations in the same order as kernels/cpu.py, so the same bytes; the stats are summed in float64."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ..term import Term
from .jit import njit
from .stats import Stats

BLOCK = 2048  # elements per inner step: the float temporaries stay in registers and L1
BF16_NAN = np.uint16(0x7FC0)
F32_NAN = np.uint32(0x7FC00000)
SHIFT = np.uint32(16)


def _bitcast(to: types.Type, llvm_to: ir.Type) -> Any:
    """A numba intrinsic: the same 32 bits read as `to` (no conversion)."""
    frm = types.uint32 if to == types.float32 else types.float32

    def typer(typingctx: object, x: types.Type) -> tuple:
        def codegen(context: object, builder: ir.IRBuilder, sig: object, args: list) -> ir.Value:
            return builder.bitcast(args[0], llvm_to)

        return to(frm), codegen

    return intrinsic(typer)


_as_f32 = _bitcast(types.float32, ir.FloatType())  # float32 of these bits
_as_u32 = _bitcast(types.uint32, ir.IntType(32))  # the bits of this float32


@njit(nogil=True, fastmath={"reassoc"})
def _sum_sq(x: np.ndarray, n: int) -> float:
    """Σ x² in float64 over x[:n], in any order (a statistic, not bytes: reassociation lets it vectorize)."""
    total = 0.0
    for k in range(n):
        v = np.float64(x[k])
        total += v * v
    return total


@njit(nogil=True, inline="always")
def _widen(b):
    """A bfloat16's bits (uint16) to its float32 (exact)."""
    return _as_f32(np.uint32(b) << SHIFT)


@njit(nogil=True, inline="always")
def _narrow(b):
    """A float32's bits (uint32) to bfloat16 bits, to nearest even (past the largest finite value: Inf; a NaN may
    come out as anything with an all-ones exponent: callers keep NaN apart)."""
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> SHIFT) & np.uint32(1))) >> SHIFT)


@njit(nogil=True)
def _delta(acc, plus, minus, alphas, s, m):
    """acc[:m] = Σ alpha·(plus − minus) over bfloat16 elements [s, s + m), in float32, term by term (× 1 is exact:
    every term is multiplied). Loops index block views from 0: no negative-index checks, so they vectorize."""
    for t in range(len(plus)):
        p, q, a = plus[t][s : s + m], minus[t][s : s + m], alphas[t]
        if t == 0:
            for k in range(m):
                acc[k] = (_widen(p[k]) - _widen(q[k])) * a
        else:
            for k in range(m):
                acc[k] += (_widen(p[k]) - _widen(q[k])) * a


@njit(nogil=True)
def _add_round(acc, cp, out, m, c_out, update):
    """acc[:m] += cp (float32), out = acc rounded to bfloat16 (`_narrow`; NaN: see `_fix_nonfinite`); c_out: CP as
    float32, update: out − CP."""
    for k in range(m):
        c = _widen(cp[k])
        c_out[k] = c
        y = acc[k] + c
        acc[k] = y
        r = _narrow(_as_u32(y))
        out[k] = r
        update[k] = _widen(r) - c


@njit(nogil=True)
def _fix_nonfinite(acc, out, m):
    """Where the sum was NaN, write the canonical NaN; count NaN and Inf in out[:m]."""
    nans = infs = 0
    for k in range(m):
        if np.isnan(acc[k]):
            out[k] = BF16_NAN
            nans += 1
        elif np.isinf(_widen(out[k])):
            infs += 1
    return nans, infs


@njit(nogil=True)
def _merge_bf16(out, cp, plus, minus, alphas, stats):
    """bfloat16 operands as uint16 arrays, `plus`/`minus` tuples of them, `alphas` float32; computed in float32.
    stats: [cp², Δ², update², NaN, Inf] added to."""
    n = out.shape[0]
    acc = np.empty(BLOCK, np.float32)
    c = np.empty(BLOCK, np.float32)
    update = np.empty(BLOCK, np.float32)
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        _delta(acc, plus, minus, alphas, s, m)
        stats[1] += _sum_sq(acc, m)
        block = out[s : s + m]
        _add_round(acc, cp[s : s + m], block, m, c, update)
        cp_sq, update_sq = _sum_sq(c, m), _sum_sq(update, m)
        stats[0] += cp_sq
        stats[2] += update_sq
        if not (np.isfinite(cp_sq) and np.isfinite(update_sq)):  # a NaN or an Inf in CP or in the output
            nans, infs = _fix_nonfinite(acc, block, m)
            stats[3] += nans
            stats[4] += infs


@njit(nogil=True)
def _delta_f64(acc, plus, minus, alphas, s, m):
    """acc[:m] = Σ alpha·(plus − minus) over float32 elements [s, s + m), in float64, term by term."""
    for t in range(len(plus)):
        p, q, a = plus[t][s : s + m], minus[t][s : s + m], alphas[t]
        if t == 0:
            for k in range(m):
                acc[k] = (np.float64(p[k]) - np.float64(q[k])) * a
        else:
            for k in range(m):
                acc[k] += (np.float64(p[k]) - np.float64(q[k])) * a


@njit(nogil=True)
def _fix_nonfinite_f32(out):
    """Write the canonical NaN over every NaN of `out` (float32 bits); count NaN and Inf."""
    nans = infs = 0
    for k in range(out.shape[0]):
        o = _as_f32(out[k])
        if np.isnan(o):
            out[k] = F32_NAN
            nans += 1
        elif np.isinf(o):
            infs += 1
    return nans, infs


@njit(nogil=True)
def _merge_f32(out, cp, plus, minus, alphas, stats):
    """float32 operands (`out` as uint32 bits, to write the canonical NaN), computed in float64."""
    n = out.shape[0]
    acc = np.empty(BLOCK, np.float64)
    c = np.empty(BLOCK, np.float64)
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        _delta_f64(acc, plus, minus, alphas, s, m)
        stats[1] += _sum_sq(acc, m)
        block, cps = out[s : s + m], cp[s : s + m]
        for k in range(m):
            x = np.float64(cps[k])
            c[k] = x
            o = np.float32(acc[k] + x)
            block[k] = _as_u32(o)
            acc[k] = np.float64(o) - x
        cp_sq, update_sq = _sum_sq(c, m), _sum_sq(acc, m)
        stats[0] += cp_sq
        stats[2] += update_sq
        if not (np.isfinite(cp_sq) and np.isfinite(update_sq)):  # a NaN or an Inf in CP or in the output
            nans, infs = _fix_nonfinite_f32(block)
            stats[3] += nans
            stats[4] += infs


def combine_fused(out: torch.Tensor, cp: torch.Tensor, terms: Sequence[Term]) -> Stats:
    """kernels/cpu.py's `combine` where its `_fusable` says so: bfloat16 or float32 throughout, CP there."""
    stats = np.zeros(5, np.float64)
    if out.dtype == torch.bfloat16:
        bits = _u16
        alphas = np.array([t[0] for t in terms], np.float32)
        plus = tuple(bits(p) for _, p, _ in terms)
        minus = tuple(bits(m) for _, _, m in terms)
        _merge_bf16(bits(out), bits(cp), plus, minus, alphas, stats)
    else:
        alphas = np.array([t[0] for t in terms], np.float64)
        plus = tuple(p.numpy() for _, p, _ in terms)
        minus = tuple(m.numpy() for _, _, m in terms)
        _merge_f32(out.view(torch.int32).numpy().view(np.uint32), cp.numpy(), plus, minus, alphas, stats)
    return Stats(float(stats[0]), float(stats[1]), float(stats[2]), int(stats[3]), int(stats[4]))


def _u16(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)
