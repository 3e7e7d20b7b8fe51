"""The fused GPU kernel: `out = round(cp + Σ alpha·(plus − minus))`, each input read once, output written once.

Up to four vectors per launch; more are chained through a float accumulator, in the CPU kernel's order, so
the bytes equal the CPU path's (no FMA contraction; alphas passed as a double's bits, not narrowed to float32;
NaN written as the canonical quiet NaN). Conversions to and from bfloat16 are done by hand (to nearest even;
subnormals exact) because Triton's interpreter truncates and mangles subnormals; on a GPU the same code gives
the same bits. Each program also stores its block's sums of squares and NaN/Inf counts in a row of partials,
summed once per call into a float64 stats buffer: no two programs touch the same address (no atomics to
contend on), and the stats come out the same on every run.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..term import Term
from .sparse import Sparse

MAX_TERMS = 4
BLOCK = 2048  # elements per program
NUM_WARPS = 4  # 16 elements per thread: two 16-byte loads of bf16 per input
STATS = 5  # cp², Δ², (out − cp)², NaN, Inf
ROW = STATS + MAX_TERMS  # a program's partials: the stats, then each term's elements DARE kept
_STATS, _ROW = tl.constexpr(STATS), tl.constexpr(ROW)  # the same, as the kernel sees them
_TL = {torch.float32: tl.float32, torch.float64: tl.float64}
# One launch at a time per process: Triton's JIT cache and first-time compile are not thread-safe (nor is the
# interpreter, which patches triton.language while a kernel runs). A compiled launch is asynchronous, so the
# threads of a GPU worker wait microseconds here, not for the kernel.
_LAUNCH = threading.Lock()


@triton.jit
def _round_out(x, OUT_KIND: tl.constexpr):
    """Compute dtype → output dtype, NaN written as the canonical quiet NaN (as the CPU kernel does). OUT_KIND:
    0 float32, 1 bfloat16 (rounded by hand to nearest even), 2 float16 (each through float32, as torch does),
    3 float64."""
    if OUT_KIND == 3:
        bits64 = x.to(tl.float64).to(tl.int64, bitcast=True)
        nan64 = (bits64 & 0x7FFFFFFFFFFFFFFF) > 0x7FF0000000000000
        return tl.where(nan64, 0x7FF8000000000000, bits64).to(tl.int64).to(tl.float64, bitcast=True)
    elif OUT_KIND == 1:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(nan, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT_KIND == 2:
        half = x.to(tl.float32).to(tl.float16).to(tl.uint16, bitcast=True)
        return tl.where((half & 0x7FFF) > 0x7C00, 0x7E00, half).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, bits).to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _widen(x, COMPUTE: tl.constexpr):
    """To the compute dtype; bfloat16 widened by hand (exact, as on a GPU: the interpreter gets subnormals wrong).
    (No float8: planning keeps float8 tensors as they are stored, never through a kernel.)"""
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(COMPUTE)


@triton.jit
def _load(ptr, offs, mask, COMPUTE: tl.constexpr):
    return _widen(tl.load(ptr + offs, mask=mask, other=0.0), COMPUTE)


@triton.jit
def _fmix(h):
    """`planning.sparsity.fmix32` on int64 lanes holding 32-bit words (products wrap; the low 32 bits are kept)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _dare_keep(index, salt, threshold):
    """DARE keeps element `index` (flat, within its tensor) where its hash is below the threshold."""
    s = salt.to(tl.int64)
    high = _fmix((index >> 32) ^ s)
    return _fmix(_fmix((index & 0xFFFFFFFF) ^ high) ^ s) < threshold.to(tl.int64)


@triton.jit
def _term(
    acc,
    plus_ptr,
    minus_ptr,
    alpha_bits,
    salt,
    threshold,
    index,
    offs,
    mask,
    HAS_MINUS: tl.constexpr,
    HAS_DARE: tl.constexpr,
    FIRST: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """acc + alpha·(plus − minus), DARE's dropped elements zeroed first; and how many this program kept."""
    d = _load(plus_ptr, offs, mask, COMPUTE)
    if HAS_MINUS:
        d = d - _load(minus_ptr, offs, mask, COMPUTE)
    kept = tl.sum(mask.to(tl.float64), axis=0)
    if HAS_DARE:
        keep = _dare_keep(index, salt, threshold)
        d = tl.where(keep, d, 0.0)
        kept = tl.sum((keep & mask).to(tl.float64), axis=0)
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if alpha != 1.0:
        d = d * alpha.to(COMPUTE)  # as torch does: alpha rounded (to nearest) to the compute dtype
    if FIRST:
        return d, kept
    return acc + d, kept


@triton.jit(do_not_specialize=["a0", "a1", "a2", "a3", "s0", "s1", "s2", "s3", "t0", "t1", "t2", "t3", "first"])
def _merge_kernel(  # alphas: a double's bits (n == 1 is not special); DARE's salts, thresholds, first index
    out_ptr,
    cp_ptr,
    acc_ptr,
    partials_ptr,
    p0,
    m0,
    a0,
    s0,
    t0,
    p1,
    m1,
    a1,
    s1,
    t1,
    p2,
    m2,
    a2,
    s2,
    t2,
    p3,
    m3,
    a3,
    s3,
    t3,
    n,
    first,
    N_TERMS: tl.constexpr,
    MINUS: tl.constexpr,
    DARE: tl.constexpr,
    HAS_CP: tl.constexpr,
    ACC_IN: tl.constexpr,
    ACC_OUT: tl.constexpr,
    COMPUTE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    index = first.to(tl.int64) + offs  # within the tensor: DARE's mask does not depend on units or strips
    row = partials_ptr + pid * _ROW
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    if ACC_IN:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0)
    if N_TERMS > 0:
        acc, kept = _term(
            acc, p0, m0, a0, s0, t0, index, offs, mask, (MINUS & 1) != 0, (DARE & 1) != 0, not ACC_IN, COMPUTE
        )
        tl.store(row + _STATS, kept)
    if N_TERMS > 1:
        acc, kept = _term(acc, p1, m1, a1, s1, t1, index, offs, mask, (MINUS & 2) != 0, (DARE & 2) != 0, False, COMPUTE)
        tl.store(row + _STATS + 1, kept)
    if N_TERMS > 2:
        acc, kept = _term(acc, p2, m2, a2, s2, t2, index, offs, mask, (MINUS & 4) != 0, (DARE & 4) != 0, False, COMPUTE)
        tl.store(row + _STATS + 2, kept)
    if N_TERMS > 3:
        acc, kept = _term(acc, p3, m3, a3, s3, t3, index, offs, mask, (MINUS & 8) != 0, (DARE & 8) != 0, False, COMPUTE)
        tl.store(row + _STATS + 3, kept)
    if ACC_OUT:  # more vectors follow in another launch
        tl.store(acc_ptr + offs, acc, mask=mask)
    else:
        _finish(acc, out_ptr, cp_ptr, row, offs, mask, N_TERMS > 0 or ACC_IN, HAS_CP, COMPUTE, OUT_KIND)


@triton.jit
def _finish(
    acc,
    out_ptr,
    cp_ptr,
    row,
    offs,
    mask,
    ADD: tl.constexpr,
    HAS_CP: tl.constexpr,
    COMPUTE: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    """out = round(cp + acc) (or cp itself where not ADD), and this program's cp², Δ², (out − cp)², NaN, Inf (zeros
    where not computed) in its row of partials. Lanes past n add nothing: every input loads 0 there and alphas are
    finite in float32 (spec.FLOAT32_MAX). (Masked, the kernel ran at 88 % of a D2D copy on an H200, against
    91–93 % without.)"""
    tl.store(row + 1, tl.sum(acc * acc, axis=0).to(tl.float64))
    cp_sq = tl.zeros([], dtype=tl.float64)
    if HAS_CP:
        c = _load(cp_ptr, offs, mask, COMPUTE)
        cp_sq = tl.sum(c * c, axis=0).to(tl.float64)
        if ADD:
            acc = acc + c
        else:  # a copy: 0 + c would turn -0.0 into +0.0
            acc = c
    tl.store(row + 0, cp_sq)
    o = _round_out(acc, OUT_KIND)
    tl.store(out_ptr + offs, o, mask=mask)
    r = _widen(o, COMPUTE)  # exact: the compute dtype holds every output value
    tl.store(row + 3, tl.sum((r != r).to(tl.float64), axis=0))
    tl.store(row + 4, tl.sum(((r == float("inf")) | (r == float("-inf"))).to(tl.float64), axis=0))
    if HAS_CP:
        r = r - c
    tl.store(row + 2, tl.sum(r * r, axis=0).to(tl.float64))


_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def _bits(alpha: float) -> int:
    """A double passed as its 64 bits: Triton would pass a Python float as float32 (a float64 merge needs all)."""
    return struct.unpack("<q", struct.pack("<d", float(alpha)))[0]


class TritonScratch:
    """Device buffers reused across calls, by key: the kernel's float accumulator (more than MAX_TERMS vectors)
    and partials, and the callers' own (a worker's inputs and output on the device)."""

    def __init__(self) -> None:
        self._bufs: dict[object, torch.Tensor] = {}

    def get(self, key: object, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def launches(
    out: torch.Tensor,
    cp: torch.Tensor | None,
    terms: Sequence[Term],
    compute: torch.dtype,
    acc: torch.Tensor,
    partials: torch.Tensor,
    sparse: Sparse | None = None,
) -> list[tuple[list, dict]]:
    """The kernel's launches for one call, in order: (positional arguments, constexprs) of each."""
    groups = [range(i, min(len(terms), i + MAX_TERMS)) for i in range(0, len(terms), MAX_TERMS)] or [range(0)]
    calls = []
    for g, group in enumerate(groups):
        last = g == len(groups) - 1
        args: list[object] = [out, cp if cp is not None and last else out, acc, partials]
        minus_bits = dare_bits = 0
        for i in range(MAX_TERMS):
            if i < len(group):
                alpha, plus, minus = terms[group[i]]
                dare = sparse.term_dare(group[i]) if sparse is not None else None
                alpha = sparse.alpha(group[i], alpha) if sparse is not None else alpha
                salt, threshold = (dare.salt, dare.threshold) if dare is not None else (0, 0)
                args += [plus, minus if minus is not None else plus, _bits(alpha), salt, threshold]
                minus_bits |= (minus is not None) << i
                dare_bits |= (dare is not None) << i
            else:
                args += [out, out, _bits(1.0), 0, 0]
        calls.append(
            (
                args + [out.numel(), sparse.first if sparse is not None else 0],
                dict(
                    N_TERMS=len(group),
                    MINUS=minus_bits,
                    DARE=dare_bits,
                    HAS_CP=cp is not None and last,
                    ACC_IN=g > 0,
                    ACC_OUT=not last,
                    COMPUTE=_TL[compute],
                    OUT_KIND=_OUT_KIND[out.dtype],
                    BLOCK=BLOCK,
                ),
            )
        )
    return calls


def launch_options() -> dict:
    """No FMA contraction: the same roundings as the CPU kernel."""
    return {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


def combine_triton(
    out: torch.Tensor,
    cp: torch.Tensor | None,
    terms: Sequence[Term],
    compute: torch.dtype,
    stats: torch.Tensor,
    scratch: TritonScratch | None = None,
    sparse: Sparse | None = None,
) -> None:
    """The CPU kernel's contract on device tensors; adds [cp², Δ², (out−cp)², NaN, Inf] into `stats` (float64),
    and under DARE each term's kept elements after them (`stats` then holds 5 + len(terms) values)."""
    n = out.numel()
    if n == 0:
        return
    if sparse is not None and sparse.ties is not None:
        raise ValueError("TIES has its own kernel: triton_ties.ties_triton")
    scratch = scratch or TritonScratch()
    grid = (triton.cdiv(n, BLOCK),)
    acc = scratch.get("acc", n, compute, out.device) if len(terms) > MAX_TERMS else out
    partials = scratch.get("partials", grid[0] * ROW, torch.float64, out.device)
    for g, (args, constexprs) in enumerate(launches(out, cp, terms, compute, acc, partials, sparse)):
        with _LAUNCH:
            _merge_kernel[grid](*args, **constexprs, **launch_options())
        if sparse is not None:
            n_terms = constexprs["N_TERMS"]
            start = STATS + g * MAX_TERMS
            stats[start : start + n_terms] += partials.view(grid[0], ROW)[:, STATS : STATS + n_terms].sum(0)
    stats[:STATS] += partials.view(grid[0], ROW)[:, :STATS].sum(0)
