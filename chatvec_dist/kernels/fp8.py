"""The fused CPU pass for block-scaled FP8: dequantize → combine → round or requantize, tile by tile.

A tile is 128 rows (one block row) by up to TILE_COLS columns, so the float temporaries stay in cache and no
full-tensor temporary exists. The definition (docs/exactness.md):
- an FP8 input's value is `float32(q) × scale` of its 128×128 block, one float32 multiply;
- the combine runs in float64 (the dequantized operands are float32 values), in the CPU kernel's order;
- to a 16/32-bit output the float64 result is rounded as torch converts it;
- to FP8: rounded to float32 first; per block, `amax` = the largest |value| among the finite ones,
  `scale = amax / 448` (float32 division; 1 where that is 0), `q = e4m3(clamp(value / scale, ±448))` (float32
  division, round to nearest even; NaN stays NaN, written 0x7F; ±Inf saturate), and the scale is stored as the
  block's `weight_scale_inv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..term import Term
from .cpu import FUSED_MIN
from .stats import Stats

BLOCK = 128
FP8_MAX = 448.0
TILE_COLS = 4 * BLOCK  # columns per tile: a 128 × 512 float64 temporary is 512 KiB
FP8_NAN = 0x7F


@dataclass(frozen=True)
class Blocked:
    """A block-scaled FP8 operand: whole rows of float8_e4m3fn values (flat) and their float32 scales (flat,
    ⌈rows/128⌉ × ⌈cols/128⌉)."""

    values: torch.Tensor
    scale: torch.Tensor


Operand = torch.Tensor | Blocked


class Fp8Scratch:
    """Tile temporaries, reused across calls: three float64, two float32, the codes as int32; and every code's
    float32 value (a table lookup decodes several times faster than torch's float8 conversion on a CPU)."""

    def __init__(self) -> None:
        n = BLOCK * TILE_COLS
        self.f64 = [torch.empty(n, dtype=torch.float64) for _ in range(3)]
        self.f32 = [torch.empty(n, dtype=torch.float32) for _ in range(2)]
        self.codes = torch.empty(n, dtype=torch.int32)
        self.table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()

    def decode(self, codes: torch.Tensor, dst: torch.Tensor) -> None:
        """dst (contiguous float32) = the float8_e4m3fn `codes` (any strides, same shape), exactly."""
        idx = self.codes[: dst.numel()].view(dst.shape)
        idx.copy_(codes.view(torch.uint8))
        torch.index_select(self.table, 0, idx.view(-1), out=dst.view(-1))


def _grid(n: int) -> int:
    return -(-n // BLOCK)


@dataclass(frozen=True)
class _Tile:
    rows: int
    cols: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.r1 - self.r0, self.c1 - self.c0)

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """This tile of a flat row-major [rows, cols] tensor (a strided view)."""
        return flat.view(self.rows, self.cols)[self.r0 : self.r1, self.c0 : self.c1]

    def scales(self, flat: torch.Tensor) -> torch.Tensor:
        """The tile's blocks' entries of a flat scale grid (a view)."""
        grid = flat.view(_grid(self.rows), _grid(self.cols))
        return grid[self.r0 // BLOCK, self.c0 // BLOCK : _grid(self.c1)]

    def per_column(self, scales: torch.Tensor) -> torch.Tensor:
        return scales.repeat_interleave(BLOCK)[: self.c1 - self.c0]


def _load(x: Operand, tile: _Tile, dst: torch.Tensor, f32: torch.Tensor, scratch: Fp8Scratch) -> None:
    """dst = the tile's values in float64 (an FP8 operand dequantized in float32 first)."""
    if isinstance(x, Blocked):
        scratch.decode(tile.of(x.values), f32)
        f32.mul_(tile.per_column(tile.scales(x.scale)))
        dst.copy_(f32)
    else:
        dst.copy_(tile.of(x))


def combine_fp8(
    out: torch.Tensor,
    out_scale: torch.Tensor | None,
    cp: Operand | None,
    terms: Sequence[Term],
    cols: int,
    scratch: Fp8Scratch,
) -> Stats:
    """`out = cp + Σ alpha·(plus − minus)` over a flat [rows, cols] tensor, any operand block-scaled FP8; an FP8
    `out` gets its block scales in `out_scale` (flat, ⌈rows/128⌉ × ⌈cols/128⌉)."""
    rows = out.numel() // cols if cols else 0
    if out.numel() >= FUSED_MIN and _fusable(out, out_scale, cp, terms, cols):
        from .fp8_fused import combine_fp8_fused  # numba: imported where used

        return combine_fp8_fused(out, out_scale, cp, terms, cols, scratch.table)  # type: ignore[arg-type]
    stats = Stats()
    for r0 in range(0, rows, BLOCK):
        for c0 in range(0, cols, TILE_COLS):
            tile = _Tile(rows, cols, r0, min(rows, r0 + BLOCK), c0, min(cols, c0 + TILE_COLS))
            stats.add(_combine_tile(tile, out, out_scale, cp, terms, scratch))
    return stats


def _fusable(
    out: torch.Tensor, out_scale: torch.Tensor | None, cp: Operand | None, terms: Sequence[Term], cols: int
) -> bool:
    """Whether the fused pass (kernels/fp8_fused.py) computes this combine: an FP8 (with scales) or bfloat16
    output, CP and both sides of every vector block-scaled FP8; all of them whole [rows, cols] and contiguous
    (it indexes them unchecked), else the torch pass (which says what does not fit)."""
    operands = [cp, *(s for _, plus, minus in terms for s in (plus, minus))]
    n = out.numel()
    grid = _grid(n // cols) * _grid(cols) if cols and n % cols == 0 else -1  # -1: no grid fits
    to = out.dtype == torch.bfloat16 or (out.dtype == torch.float8_e4m3fn and _fits(out_scale, grid))
    return to and bool(terms) and out.is_contiguous() and all(_fits(x, grid, n) for x in operands)


def _fits(x: Operand | torch.Tensor | None, grid: int, n: int = 0) -> bool:
    """A contiguous scale grid of `grid` entries; with `n`, a Blocked operand of n values and such a grid."""
    if not n:
        return isinstance(x, torch.Tensor) and x.is_contiguous() and x.numel() == grid
    return isinstance(x, Blocked) and x.values.is_contiguous() and x.values.numel() == n and _fits(x.scale, grid)


def _combine_tile(
    tile: _Tile,
    out: torch.Tensor,
    out_scale: torch.Tensor | None,
    cp: Operand | None,
    terms: Sequence[Term],
    scratch: Fp8Scratch,
) -> Stats:
    n = tile.shape[0] * tile.shape[1]
    acc, tmp, c = (b[:n].view(tile.shape) for b in scratch.f64)
    f32, g32 = (b[:n].view(tile.shape) for b in scratch.f32)
    stats = Stats()
    _delta(tile, acc, tmp, c, f32, terms, scratch)
    if terms:
        stats.delta_sq = float(torch.dot(acc.view(-1), acc.view(-1)))
    if cp is not None:
        _load(cp, tile, c, f32, scratch)
        stats.cp_sq = float(torch.dot(c.view(-1), c.view(-1)))
        if terms:
            acc.add_(c)
        else:
            acc.copy_(c)
    dst_tile = tile.of(out)
    if out_scale is None:
        dst_tile.copy_(acc)
        tmp.copy_(dst_tile)
    else:
        _requantize(tile, acc, dst_tile, tile.scales(out_scale), scratch)
        tmp.copy_(g32)  # the written values, dequantized
    if cp is not None:
        tmp.sub_(c)
    stats.update_sq = float(torch.dot(tmp.view(-1), tmp.view(-1)))
    if not (math.isfinite(stats.cp_sq) and math.isfinite(stats.update_sq)):
        _count_nonfinite(dst_tile, stats)
    return stats


def _delta(
    tile: _Tile,
    acc: torch.Tensor,
    tmp: torch.Tensor,
    c: torch.Tensor,
    f32: torch.Tensor,
    terms: Sequence[Term],
    scratch: Fp8Scratch,
) -> None:
    """acc = Σ alpha·(plus − minus) over the tile, in the CPU kernel's order (tmp, c, f32: scratch)."""
    for i, (alpha, plus, minus) in enumerate(terms):
        dst = acc if i == 0 else tmp
        _load(plus, tile, dst, f32, scratch)
        if minus is not None:
            _load(minus, tile, c, f32, scratch)
            dst.sub_(c)
        if alpha != 1.0:
            dst.mul_(alpha)
        if i:
            acc.add_(tmp)


def _requantize(tile: _Tile, acc: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, scratch: Fp8Scratch) -> None:
    """Per 128×128 block of the tile: its scale into `scales`, its codes into `q`; the second float32 scratch =
    the codes dequantized."""
    n = acc.numel()
    f32, g32 = (b[:n].view(acc.shape) for b in scratch.f32)
    f32.copy_(acc)  # the combined values, rounded once to float32
    torch.abs(f32, out=g32)
    g32.nan_to_num_(nan=0.0, posinf=0.0)  # amax over the finite values
    width = tile.c1 - tile.c0
    amax = torch.stack([g32[:, j : j + BLOCK].amax() for j in range(0, width, BLOCK)])
    scale = amax / FP8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scales.copy_(scale)
    per_column = tile.per_column(scale)
    f32.div_(per_column)
    f32.clamp_(-FP8_MAX, FP8_MAX)
    q.copy_(f32)
    nan = torch.isnan(f32)
    if bool(nan.any()):
        q.view(torch.uint8)[nan] = FP8_NAN
    scratch.decode(q, g32)
    g32.mul_(per_column)


def _count_nonfinite(written: torch.Tensor, stats: Stats) -> None:
    """Exact NaN/Inf counts of the written tile; NaN as the canonical quiet NaN of 16/32-bit outputs."""
    from .cpu import CANONICAL_NAN

    wide = written.float() if written.element_size() == 1 else written
    nan = torch.isnan(wide)
    stats.nan += int(nan.sum())
    stats.inf += int(torch.isinf(wide).sum())
    if stats.nan and written.dtype in CANONICAL_NAN:
        bits, canonical = CANONICAL_NAN[written.dtype]
        written.view(bits)[nan] = canonical
