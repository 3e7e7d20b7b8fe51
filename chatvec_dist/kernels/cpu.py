"""The CPU kernel: one pass over memory in cache-sized chunks, into reused buffers, with the stats."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..term import Term
from .sparse import Sparse, term_delta, ties_delta
from .stats import Stats

CHUNK = 1 << 18  # elements per step: the float temporaries stay in cache
FUSED_MIN = 1 << 16  # elements: from here on the fused kernel (its first use costs a process about a second)
SMALL_NORMS = 1 << 16  # elements: a tensor below this has `sq_sums`' sums of squares (as in a run of small tensors)
FUSED = {torch.bfloat16: torch.float32, torch.float32: torch.float64}  # its dtypes: operands and output, compute
CANONICAL_NAN = {
    torch.bfloat16: (torch.int16, 0x7FC0),
    torch.float16: (torch.int16, 0x7E00),
    torch.float32: (torch.int32, 0x7FC00000),
    torch.float64: (torch.int64, 0x7FF8000000000000),
}


class Scratch:
    """Float temporaries reused across calls, one set per compute dtype."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._terms: dict[object, list[torch.Tensor]] = {}
        self._squares: np.ndarray | None = None

    def squares(self, n: int) -> np.ndarray:
        """A float64 buffer of `n` ≤ CHUNK elements (`sq_sums`' squares)."""
        if self._squares is None:
            self._squares = np.empty(CHUNK, np.float64)
        return self._squares[:n]

    def get(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if dtype not in self._bufs:
            self._bufs[dtype] = (
                torch.empty(CHUNK, dtype=dtype),
                torch.empty(CHUNK, dtype=dtype),
                torch.empty(CHUNK, dtype=dtype),
            )
        return self._bufs[dtype]

    def per_term(self, dtype: torch.dtype, n: int) -> list[torch.Tensor]:
        """`n` more chunk buffers (TIES holds every term's delta at once)."""
        key = (dtype, "terms")
        bufs = self._terms.setdefault(key, [])
        bufs += [torch.empty(CHUNK, dtype=dtype) for _ in range(n - len(bufs))]
        return bufs[:n]


def sq_sums(x: torch.Tensor, starts: np.ndarray, scratch: Scratch) -> list[float]:
    """Each slice's sum of squares (slice i: elements [starts[i], starts[i + 1]) of `x`, the last to its end), in
    float64: the squares of the values (exact for float32) summed by numpy's `add.reduceat`, whose sum of a slice
    depends on the slice's values alone, not on where it lies in `x`. One call for a run of small tensors."""
    values = x.numpy()
    squares = np.square(values, out=scratch.squares(values.size), dtype=np.float64)
    return np.add.reduceat(squares, starts).tolist()


_WHOLE = np.zeros(1, np.intp)  # sq_sums' slices: the whole tensor


def _dot(x: torch.Tensor, scratch: Scratch) -> float:
    """A strip's sum of squares from 65,536 elements on: a float32 (or float64) dot product."""
    return float(torch.dot(x, x))


def _small(x: torch.Tensor, scratch: Scratch) -> float:
    """A smaller tensor's sum of squares: `sq_sums`, as a run of small tensors computes each of its own."""
    return sq_sums(x, _WHOLE, scratch)[0]


def _delta(
    acc: torch.Tensor, tmp: torch.Tensor, terms: Sequence[Term], s: int, e: int, sparse: Sparse | None, stats: Stats
) -> None:
    """acc = Σ alpha·(plus − minus) over elements [s, e), in acc's dtype (tmp: scratch of the same size); under
    DARE, each term's dropped elements zeroed and its alpha divided by the density first."""
    for i, term in enumerate(terms):
        dst, keep = term_delta(acc if i == 0 else tmp, term, i, sparse, s, e)
        if sparse is not None:
            stats.kept[i] += int(keep.sum()) if keep is not None else e - s
        alpha = sparse.alpha(i, term[0]) if sparse is not None else term[0]
        if alpha != 1.0:
            dst.mul_(alpha)
        if i:
            acc.add_(tmp)


def combine(
    out: torch.Tensor,
    cp: torch.Tensor | None,
    terms: Sequence[Term],
    compute: torch.dtype,
    scratch: Scratch,
    sparse: Sparse | None = None,
) -> Stats:
    """`out = round(cp + Σ alpha·(plus − minus))`, all 1-D of equal length, computed in `compute` per chunk;
    `sparse`: with DARE and TIES (kernels/sparse.py)."""
    if sparse is None and out.numel() >= FUSED_MIN and _fusable(out, cp, terms, compute):
        from .cpu_fused import combine_fused  # numba: imported where used

        return combine_fused(out, cp, terms)  # type: ignore[arg-type]
    acc_buf, tmp_buf, cp_buf = scratch.get(compute)
    stats = Stats(kept=[0] * len(terms) if sparse is not None and terms else [])
    ties = sparse is not None and sparse.ties is not None and bool(terms)
    bufs = scratch.per_term(compute, len(terms) + 1) if ties else []
    n = out.numel()
    sq = _small if n < SMALL_NORMS else _dot  # one strip below SMALL_NORMS (CHUNK is larger)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        acc, tmp = acc_buf[: e - s], tmp_buf[: e - s]
        if ties:
            ties_delta(acc, [b[: e - s] for b in bufs], terms, sparse, s, e, stats)  # type: ignore[arg-type]
        else:
            _delta(acc, tmp, terms, s, e, sparse, stats)
        if terms:
            stats.delta_sq += sq(acc, scratch)
        # update_sq: of the output as written (rounded), minus CP; an output value that rounding made ±Inf makes
        # it non-finite too, so the exact count below runs whenever the output holds a NaN or an Inf.
        if cp is None:
            out[s:e].copy_(acc)
            tmp.copy_(out[s:e])
            update_sq = sq(tmp, scratch)
            finite = math.isfinite(update_sq)
        else:
            c = cp_buf[: e - s]
            c.copy_(cp[s:e])
            cp_sq = sq(c, scratch)
            stats.cp_sq += cp_sq
            if terms:
                acc.add_(c)
                out[s:e].copy_(acc)
            else:
                out[s:e].copy_(c)
            tmp.copy_(out[s:e])
            tmp.sub_(c)
            update_sq = sq(tmp, scratch)
            finite = math.isfinite(cp_sq) and math.isfinite(update_sq)
        stats.update_sq += update_sq
        if not finite:  # rare: count exactly, and write NaN as the canonical quiet NaN (as the GPU kernel does)
            chunk = out[s:e]
            nan = torch.isnan(chunk)
            stats.nan += int(nan.sum())
            stats.inf += int(torch.isinf(chunk).sum())
            if stats.nan and chunk.dtype in CANONICAL_NAN:  # float8 formats have a single NaN per sign
                bits, canonical = CANONICAL_NAN[chunk.dtype]
                chunk.view(bits)[nan] = canonical
    return stats


def _fusable(out: torch.Tensor, cp: torch.Tensor | None, terms: Sequence[Term], compute: torch.dtype) -> bool:
    """Whether the fused kernel (kernels/cpu_fused.py) computes this combine: CP and both sides of every vector
    there, all of the output's dtype, one it takes, with its compute dtype; all contiguous and of the output's
    length (it indexes them unchecked, and numba types a tuple of mixed layouts apart), else the torch kernel."""
    if cp is None or not terms or FUSED.get(out.dtype) != compute or not out.is_contiguous():
        return False
    operands = [cp, *(s for _, plus, minus in terms for s in (plus, minus))]
    return all(
        t is not None
        and t.dtype == out.dtype
        and t.device.type == "cpu"
        and t.is_contiguous()
        and t.numel() == out.numel()
        for t in operands
    )


def nonfinite(x: torch.Tensor) -> Stats:
    """NaN and Inf counts of a float tensor copied as stored (no arithmetic). One sum in its own dtype (~30 GB/s)
    says whether any is there: a NaN or an Inf makes it non-finite; an overflow only sends it to the exact count."""
    if x.element_size() == 1:
        x = x.float()  # float8 (exact): torch has no sum or isinf of its own for it
    if math.isfinite(float(x.sum())):
        return Stats()
    return Stats(nan=int(torch.isnan(x).sum()), inf=int(torch.isinf(x).sum()))
