"""The fused GPU pass for block-scaled FP8: one program per 128×128 block dequantizes its operands, combines them
in float64 and rounds, or requantizes the block and stores its scale; the bytes equal the CPU pass's
(kernels/fp8.py has the definition).

FP8 codes are decoded and encoded by hand with integer operations, and both float32 divisions are correctly
rounded (`div_rn`; Triton's `/` is not on a GPU), so a GPU and Triton's interpreter make the same bits. Operands
come as uint8 views of their codes. Up to four vectors per launch; more are chained through a float64 accumulator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..term import Term
from .fp8 import Blocked, Operand
from .triton_merge import _LAUNCH, MAX_TERMS, STATS, TritonScratch, _bits, _round_out, _widen
from .triton_merge import launch_options as merge_launch_options

BLOCK = 128
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 4}


@triton.jit
def _decode(code):
    """float8_e4m3fn codes (uint8) → float32, exact; NaN as the quiet NaN."""
    b = code.to(tl.uint32)
    e = (b >> 3) & 0xF
    m = b & 0x7
    sub = (m.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)  # m × 2^-9
    mag = tl.where(e == 0, sub, ((e + 120) << 23) | (m << 20))
    mag = tl.where((e == 15) & (m == 7), 0x7FC00000, mag)
    return (mag | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _encode(x):
    """float32 with |x| ≤ 448 (or NaN) → float8_e4m3fn code, to nearest even; NaN → 0x7F."""
    bits = x.to(tl.uint32, bitcast=True)
    a = bits & 0x7FFFFFFF
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # below 2^-6: round(|x| × 2^9) to an integer, from the 24-bit significand M × 2^(E−150)
    exp = (a >> 23).to(tl.int32)
    sig = (a & 0x7FFFFF) | tl.where(exp > 0, 0x800000, 0)
    shift = tl.minimum(141 - tl.maximum(exp, 1), 26).to(tl.uint32)
    kept = sig >> shift
    rest = sig & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = (rest > half) | ((rest == half) & ((kept & 1) == 1))
    small = kept + up.to(tl.uint32)
    code = tl.where(a < (121 << 23), small, normal) | ((bits >> 24) & 0x80)
    return tl.where(a > 0x7F800000, 0x7F, code).to(tl.uint8)


@triton.jit
def _operand(ptr, scale_ptr, offs, mask, block, IS_FP8: tl.constexpr):
    """An operand's block in float64: FP8 codes × the block's scale (one float32 multiply), else widened."""
    if IS_FP8:
        v = _decode(tl.load(ptr + offs, mask=mask, other=0)) * tl.load(scale_ptr + block)
        return v.to(tl.float64)
    return _widen(tl.load(ptr + offs, mask=mask, other=0.0), tl.float64)


@triton.jit
def _term(acc, p, ps, m, ms, alpha_bits, offs, mask, block, FP8: tl.constexpr, HAS_MINUS: tl.constexpr, FIRST):
    d = _operand(p, ps, offs, mask, block, (FP8 & 1) != 0)
    if HAS_MINUS:
        d = d - _operand(m, ms, offs, mask, block, (FP8 & 2) != 0)
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if alpha != 1.0:
        d = d * alpha
    if FIRST:
        return d
    return acc + d


@triton.jit
def _sum(x):
    return tl.sum(tl.sum(x.to(tl.float64), axis=1), axis=0)


@triton.jit
def _store(acc, out_ptr, out_scale_ptr, offs, mask, block, OUT_KIND: tl.constexpr):
    """Round the block into the output, or requantize it and store its scale; the written values in float64."""
    if OUT_KIND == 4:
        v = acc.to(tl.float32)
        a = tl.abs(v)
        amax = tl.max(tl.max(tl.where(mask & (a < float("inf")), a, 0.0), axis=1), axis=0)
        scale = tl.math.div_rn(amax, 448.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        q = tl.math.div_rn(v, scale)
        q = tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q))
        code = _encode(q)
        tl.store(out_ptr + offs, code, mask=mask)
        tl.store(out_scale_ptr + block, scale)
        return (_decode(code) * scale).to(tl.float64)
    o = _round_out(acc, OUT_KIND)
    tl.store(out_ptr + offs, o, mask=mask)
    return _widen(o, tl.float64)


@triton.jit(do_not_specialize=["a0", "a1", "a2", "a3"])
def _fp8_kernel(
    out_ptr,
    out_scale_ptr,
    cp_ptr,
    cp_scale_ptr,
    acc_ptr,
    partials_ptr,
    p0, ps0, m0, ms0, a0,
    p1, ps1, m1, ms1, a1,
    p2, ps2, m2, ms2, a2,
    p3, ps3, m3, ms3, a3,
    rows,
    cols,
    N_TERMS: tl.constexpr,
    MINUS: tl.constexpr,
    FP8: tl.constexpr,  # bits 2i and 2i+1: term i's plus and minus are FP8; bit 8: CP
    HAS_CP: tl.constexpr,
    ACC_IN: tl.constexpr,
    ACC_OUT: tl.constexpr,
    OUT_KIND: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16, 4 float8_e4m3fn (requantized)
    BLOCK: tl.constexpr,
):  # fmt: skip
    br = tl.program_id(0).to(tl.int64)
    bc = tl.program_id(1).to(tl.int64)
    block = br * tl.num_programs(1) + bc
    r = br * BLOCK + tl.arange(0, BLOCK)[:, None]
    c = bc * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (r < rows) & (c < cols)
    offs = r * cols + c
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float64)
    if ACC_IN:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0)
    if N_TERMS > 0:
        acc = _term(acc, p0, ps0, m0, ms0, a0, offs, mask, block, FP8 & 3, (MINUS & 1) != 0, not ACC_IN)
    if N_TERMS > 1:
        acc = _term(acc, p1, ps1, m1, ms1, a1, offs, mask, block, (FP8 >> 2) & 3, (MINUS & 2) != 0, False)
    if N_TERMS > 2:
        acc = _term(acc, p2, ps2, m2, ms2, a2, offs, mask, block, (FP8 >> 4) & 3, (MINUS & 4) != 0, False)
    if N_TERMS > 3:
        acc = _term(acc, p3, ps3, m3, ms3, a3, offs, mask, block, (FP8 >> 6) & 3, (MINUS & 8) != 0, False)
    if ACC_OUT:  # more vectors follow in another launch
        tl.store(acc_ptr + offs, acc, mask=mask)
    else:
        row = partials_ptr + block * 5
        tl.store(row + 1, _sum(acc * acc))
        cp_sq = tl.zeros([], dtype=tl.float64)
        if HAS_CP:
            cpv = _operand(cp_ptr, cp_scale_ptr, offs, mask, block, (FP8 & 256) != 0)
            cp_sq = _sum(cpv * cpv)
            if N_TERMS > 0 or ACC_IN:
                acc = acc + cpv
            else:
                acc = cpv
        tl.store(row + 0, cp_sq)
        written = _store(acc, out_ptr, out_scale_ptr, offs, mask, block, OUT_KIND)
        tl.store(row + 3, _sum((written != written) & mask))
        tl.store(row + 4, _sum(((written == float("inf")) | (written == float("-inf"))) & mask))
        if HAS_CP:
            written = written - cpv
        tl.store(row + 2, _sum(tl.where(mask, written * written, 0.0)))


def _codes(x: Operand) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An operand as (values, scales): FP8 codes as uint8."""
    if isinstance(x, Blocked):
        return x.values.view(torch.uint8), x.scale
    return x, None


def launches(
    out: torch.Tensor,
    out_scale: torch.Tensor | None,
    cp: Operand | None,
    terms: Sequence[Term],
    cols: int,
    acc: torch.Tensor,
    partials: torch.Tensor,
) -> list[tuple[list, dict]]:
    """The kernel's launches for one call, in order: (positional arguments, constexprs) of each. `partials` also
    stands in for the pointers a launch does not read."""
    dst = out.view(torch.uint8) if out_scale is not None else out
    cp_values, cp_scale = _codes(cp) if cp is not None else (dst, None)
    groups = [terms[i : i + MAX_TERMS] for i in range(0, len(terms), MAX_TERMS)] or [[]]
    calls = []
    for g, group in enumerate(groups):
        last = g == len(groups) - 1
        args: list[object] = [dst, out_scale if out_scale is not None else partials, cp_values]
        args += [cp_scale if cp_scale is not None else partials, acc, partials]
        minus_bits, fp8_bits = 0, 256 if cp_scale is not None and last else 0
        for i in range(MAX_TERMS):
            alpha, plus, minus = group[i] if i < len(group) else (1.0, dst, None)
            (p, ps), (m, ms) = _codes(plus), _codes(minus if minus is not None else plus)
            args += [p, ps if ps is not None else partials, m, ms if ms is not None else partials, _bits(alpha)]
            minus_bits |= (i < len(group) and minus is not None) << i
            fp8_bits |= ((ps is not None) | (ms is not None and minus is not None) << 1) << (2 * i)
        constexprs = dict(
            N_TERMS=len(group),
            MINUS=minus_bits,
            FP8=fp8_bits,
            HAS_CP=cp is not None and last,
            ACC_IN=g > 0,
            ACC_OUT=not last,
            OUT_KIND=_OUT_KIND[out.dtype],
            BLOCK=BLOCK,
        )
        calls.append((args + [out.numel() // cols, cols], constexprs))
    return calls


def launch_options() -> dict:
    """No FMA contraction (as the merge kernel); 8 warps for a 128 × 128 block."""
    return {**merge_launch_options(), "num_warps": 8}


def combine_triton_fp8(
    out: torch.Tensor,
    out_scale: torch.Tensor | None,
    cp: Operand | None,
    terms: Sequence[Term],
    cols: int,
    stats: torch.Tensor,
    scratch: TritonScratch,
) -> None:
    """kernels/fp8.combine_fp8's contract on device tensors; adds [cp², Δ², (out−cp)², NaN, Inf] into `stats`."""
    n = out.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n // cols, BLOCK), triton.cdiv(cols, BLOCK))
    partials = scratch.get("fp8-partials", grid[0] * grid[1] * STATS, torch.float64, out.device)
    acc = scratch.get("fp8-acc", n, torch.float64, out.device) if len(terms) > MAX_TERMS else partials
    for args, constexprs in launches(out, out_scale, cp, terms, cols, acc, partials):
        with _LAUNCH:
            _fp8_kernel[grid](*args, **constexprs, **launch_options())
    stats += partials.view(-1, STATS).sum(0)
