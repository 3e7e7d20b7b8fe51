"""The fused CPU pass (numba) for the commonest FP8 merges: CP, chat and base all block-scaled float8_e4m3fn, into an
FP8 output or a bfloat16 one. Block by 128×128 block, the definition of kernels/fp8.py step for step (dequantize in
float32, combine in float64, round to float32, amax, scale, requantize to nearest even), so the same codes and
scales."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..term import Term
from .cpu_fused import BF16_NAN, _as_f32, _as_u32, _narrow, _sum_sq, _widen
from .fp8 import BLOCK, FP8_MAX, FP8_NAN, Blocked
from .jit import njit
from .stats import Stats

SMALLEST_NORMAL = 0x3C800000  # 2⁻⁶, float32 bits: below, e4m3's subnormals (multiples of 2⁻⁹)


@njit(nogil=True, inline="always")
def _e4m3(v):
    """The float8_e4m3fn code of a float32 v, clamped to ±448, to nearest even; NaN: 0x7F. Both roundings are
    computed and one selected (no branch: the loop vectorizes)."""
    b = _as_u32(v)
    sign = (b >> np.uint32(24)) & np.uint32(0x80)
    a = min(b & np.uint32(0x7FFFFFFF), np.uint32(0x43E00000))  # |v| ≤ 448 (NaN kept apart below)
    sub = np.uint32(np.rint(_as_f32(a) * np.float32(512.0)))  # subnormal: multiples of 2⁻⁹ (exact product)
    normal = ((a + np.uint32(0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20)) - np.uint32(960)
    code = sign | (sub if a < np.uint32(SMALLEST_NORMAL) else normal)
    return np.uint8(FP8_NAN if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else code)


@njit(nogil=True)
def _load(codes, scale, table, cols, r0, h, c0, w, dst):
    """dst[:h·w] = the block's values, float32(code) × scale in float32, widened to float64."""
    for i in range(h):
        at = (r0 + i) * cols + c0
        row, d = codes[at : at + w], dst[i * w : (i + 1) * w]
        for j in range(w):
            d[j] = np.float64(table[row[j]] * scale)


@njit(nogil=True)
def _delta(acc, p64, m64, plus, minus, alphas, table, cols, r0, h, c0, w, g):
    """acc[:h·w] = Σ alpha·(plus − minus) over the block, in float64, term by term (× 1 is exact); `plus` and
    `minus`: per term (codes, scale grid); p64, m64: scratch."""
    n = h * w
    for t in range(len(plus)):
        _load(plus[t][0], plus[t][1][g], table, cols, r0, h, c0, w, p64)
        _load(minus[t][0], minus[t][1][g], table, cols, r0, h, c0, w, m64)
        a = alphas[t]
        if t == 0:
            for k in range(n):
                acc[k] = (p64[k] - m64[k]) * a
        else:
            for k in range(n):
                acc[k] += (p64[k] - m64[k]) * a


@njit(nogil=True)
def _amax_scale(f, n):
    """The block's scale: the largest finite |value| / 448 in float32, 1 where that is 0. (Non-negative floats
    order as their bits: an integer max, which vectorizes; NaN and Inf count as 0.)"""
    amax = np.uint32(0)
    for k in range(n):
        a = _as_u32(f[k]) & np.uint32(0x7FFFFFFF)
        amax = max(amax, a if a < np.uint32(0x7F800000) else np.uint32(0))
    scale = _as_f32(amax) / np.float32(FP8_MAX)
    return np.float32(1.0) if scale == 0 else scale


@njit(nogil=True)
def _requantize(f, c, scale, table, out, cols, r0, h, c0, w, update):
    """The block's codes into `out` (f / scale in float32, clamped to ±448, to nearest even; NaN 0x7F) and
    update[:h·w] = the written values dequantized − CP."""
    for i in range(h):
        at = (r0 + i) * cols + c0
        row, fi, ci, ui = out[at : at + w], f[i * w : (i + 1) * w], c[i * w : (i + 1) * w], update[i * w : (i + 1) * w]
        for j in range(w):
            code = _e4m3(fi[j] / scale)
            row[j] = code
            ui[j] = np.float64(table[code] * scale) - ci[j]


@njit(nogil=True)
def _nan_codes(out, cols, r0, h, c0, w):
    """NaN codes (0x7F, 0xFF) in the block of `out`."""
    nans = 0
    for i in range(h):
        at = (r0 + i) * cols + c0
        row = out[at : at + w]
        for j in range(w):
            nans += (row[j] & np.uint8(0x7F)) == np.uint8(0x7F)
    return nans


@njit(nogil=True)
def _combine_block(bufs, cp, plus, minus, alphas, table, cols, r0, h, c0, w, g, stats):
    """bufs[4][:h·w] (float32) = the block's cp + Σ alpha·(plus − minus), combined in float64 and rounded once;
    bufs[3]: CP in float64. Adds Δ² and cp² to stats; returns cp²."""
    acc, p64, m64, c, f = bufs
    n = h * w
    _delta(acc, p64, m64, plus, minus, alphas, table, cols, r0, h, c0, w, g)
    stats[1] += _sum_sq(acc, n)
    _load(cp[0], cp[1][g], table, cols, r0, h, c0, w, c)
    for k in range(n):
        f[k] = np.float32(acc[k] + c[k])
    cp_sq = _sum_sq(c, n)
    stats[0] += cp_sq
    return cp_sq


@njit(nogil=True)
def _buffers():
    """Per-block scratch: acc, plus, minus and CP in float64, the combined block in float32."""
    return (
        np.empty(BLOCK * BLOCK, np.float64),
        np.empty(BLOCK * BLOCK, np.float64),
        np.empty(BLOCK * BLOCK, np.float64),
        np.empty(BLOCK * BLOCK, np.float64),
        np.empty(BLOCK * BLOCK, np.float32),
    )


@njit(nogil=True)
def _merge(out, out_scale, cp, plus, minus, alphas, table, rows, cols, stats):
    """Every 128×128 block of a [rows, cols] weight into FP8 codes and scales; `cp`, `plus[t]`, `minus[t]`:
    (codes, scale grid); stats: [cp², Δ², update², NaN, Inf] added to."""
    grid_cols = (cols + BLOCK - 1) // BLOCK
    bufs = _buffers()
    for g in range(((rows + BLOCK - 1) // BLOCK) * grid_cols):
        r0, c0 = (g // grid_cols) * BLOCK, (g % grid_cols) * BLOCK
        h, w = min(BLOCK, rows - r0), min(BLOCK, cols - c0)
        cp_sq = _combine_block(bufs, cp, plus, minus, alphas, table, cols, r0, h, c0, w, g, stats)
        acc, c, f = bufs[0], bufs[3], bufs[4]
        scale = _amax_scale(f, h * w)
        out_scale[g] = scale
        _requantize(f, c, scale, table, out, cols, r0, h, c0, w, acc)
        update_sq = _sum_sq(acc, h * w)
        stats[2] += update_sq
        if not (np.isfinite(cp_sq) and np.isfinite(update_sq)):  # e4m3fn has no Inf: NaN only
            stats[3] += _nan_codes(out, cols, r0, h, c0, w)


@njit(nogil=True)
def _to_bf16(f, c, out, cols, r0, h, c0, w, update):
    """The block into bfloat16 `out` (bits; to nearest even, NaN as 0x7FC0); update[:h·w] = written − CP; returns
    the block's (NaN, Inf) counts."""
    nans = infs = 0
    for i in range(h):
        at = (r0 + i) * cols + c0
        row, fi, ci, ui = out[at : at + w], f[i * w : (i + 1) * w], c[i * w : (i + 1) * w], update[i * w : (i + 1) * w]
        for j in range(w):
            b = _as_u32(fi[j])
            nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            r = BF16_NAN if nan else _narrow(b)
            nans += nan
            infs += (r & np.uint16(0x7FFF)) == np.uint16(0x7F80)
            row[j] = r
            ui[j] = np.float64(_widen(r)) - ci[j]
    return nans, infs


@njit(nogil=True)
def _merge_to_bf16(out, cp, plus, minus, alphas, table, rows, cols, stats):
    """As `_merge`, into a bfloat16 output (its bits): float64 → float32 → bfloat16, as torch converts."""
    grid_cols = (cols + BLOCK - 1) // BLOCK
    bufs = _buffers()
    for g in range(((rows + BLOCK - 1) // BLOCK) * grid_cols):
        r0, c0 = (g // grid_cols) * BLOCK, (g % grid_cols) * BLOCK
        h, w = min(BLOCK, rows - r0), min(BLOCK, cols - c0)
        _combine_block(bufs, cp, plus, minus, alphas, table, cols, r0, h, c0, w, g, stats)
        nans, infs = _to_bf16(bufs[4], bufs[3], out, cols, r0, h, c0, w, bufs[0])
        stats[2] += _sum_sq(bufs[0], h * w)
        stats[3] += nans
        stats[4] += infs


def combine_fp8_fused(
    out: torch.Tensor,
    out_scale: torch.Tensor | None,
    cp: Blocked,
    terms: Sequence[Term],
    cols: int,
    table: torch.Tensor,
) -> Stats:
    """kernels/fp8.py's `combine_fp8` where its `_fusable` says so (an FP8 output with its scales, or bfloat16);
    `table`: every code's float32 value."""
    stats = np.zeros(5, np.float64)
    plus = tuple(_operand(p) for _, p, _ in terms)
    minus = tuple(_operand(m) for _, _, m in terms)
    alphas = np.array([t[0] for t in terms], np.float64)
    rows, codes = out.numel() // cols, table.numpy()
    if out_scale is not None:
        _merge(
            out.view(torch.uint8).numpy(),
            out_scale.numpy(),
            _operand(cp),
            plus,
            minus,
            alphas,
            codes,
            rows,
            cols,
            stats,
        )
    else:
        bf16 = out.view(torch.int16).numpy().view(np.uint16)
        _merge_to_bf16(bf16, _operand(cp), plus, minus, alphas, codes, rows, cols, stats)
    return Stats(float(stats[0]), float(stats[1]), float(stats[2]), int(stats[3]), int(stats[4]))


def _operand(x: Blocked) -> tuple[np.ndarray, np.ndarray]:
    return x.values.view(torch.uint8).numpy(), x.scale.numpy()
