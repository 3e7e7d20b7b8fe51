"""The CPU kernel over a run of small tensors laid end to end: one pass of arithmetic for the whole run, then each
tensor's stats from its own slice, exactly as `cpu.combine` computes them for a tensor of one chunk.

Every operation is elementwise (each element rounded as on its own), and each tensor's sums of squares are
`cpu.sq_sums` of the same values (one numpy call for the whole run, a sum per tensor that depends on its values
alone), so the bytes and the stats equal a call of `cpu.combine` per tensor.

The outputs of a batch share the work that does not depend on them: Δ (and its sums) once per set of terms and
compute dtype, CP in the compute dtype (and its sums) once per CP and compute dtype."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from ..term import Term
from .cpu import CANONICAL_NAN, CHUNK, Scratch, _delta, sq_sums
from .stats import Stats

Computed = tuple[torch.Tensor, list[float]]  # a run's values in the compute dtype, and each tensor's sum of squares


class RunKernel:
    """`out = round(cp + Σ alpha·(plus − minus))` over one run of tensors (tensor i: `sizes[i]` elements), at most
    CHUNK elements in all, for each output in turn; Δ and CP kept in the scratch buffers for the next output."""

    def __init__(self, scratch: Scratch, sizes: list[int]) -> None:
        self.scratch = scratch
        self.sizes = sizes
        self.n = sum(sizes)
        assert 0 < self.n <= CHUNK
        self._deltas: dict[torch.dtype, tuple[Hashable, Computed]] = {}  # per compute dtype: its key, Δ
        self._cps: dict[torch.dtype, tuple[Hashable, Computed]] = {}
        self._starts = np.cumsum([0, *sizes[:-1]], dtype=np.intp)  # each tensor's first element

    def delta(self, key: Hashable, terms: Sequence[Term], compute: torch.dtype) -> Computed:
        """Σ alpha·(plus − minus) (at least one term) and its sums; `key` names the terms: equal keys, equal Δ."""
        held = self._deltas.get(compute)
        if held is not None and held[0] == key:
            return held[1]
        acc_buf, tmp_buf, _ = self.scratch.get(compute)
        acc = acc_buf[: self.n]
        _delta(acc, tmp_buf[: self.n], terms, 0, self.n, None, Stats())
        done = (acc, self._sums(acc))
        self._deltas[compute] = (key, done)
        return done

    def cp(self, key: Hashable, cp: torch.Tensor, compute: torch.dtype) -> Computed:
        """CP in the compute dtype and its sums; `key` names CP."""
        held = self._cps.get(compute)
        if held is not None and held[0] == key:
            return held[1]
        c = self.scratch.get(compute)[2][: self.n]
        c.copy_(cp)
        done = (c, self._sums(c))
        self._cps[compute] = (key, done)
        return done

    def combine(self, out: torch.Tensor, delta: Computed, cp: Computed | None) -> list[Stats]:
        """Write `out` (Δ and CP from `delta` and `cp`, in the same compute dtype); each tensor's Stats."""
        acc, delta_sq = delta
        tmp = self.scratch.get(acc.dtype)[1][: self.n]
        if cp is None:
            out.copy_(acc)
            tmp.copy_(out)
            cp_sq: Sequence[float] = [0.0] * len(self.sizes)
        else:
            c, cp_sq = cp
            torch.add(acc, c, out=tmp)  # acc + c as `acc.add_(c)` rounds it; Δ stays for the next output
            out.copy_(tmp)
            tmp.copy_(out)
            tmp.sub_(c)
        update_sq = self._sums(tmp)
        stats = list(map(Stats, cp_sq, delta_sq, update_sq))
        if not math.isfinite(sum(cp_sq) + sum(update_sq)):  # a NaN or an Inf somewhere (or a large sum)
            self._nonfinite(out, stats)
        return stats

    def _sums(self, x: torch.Tensor) -> list[float]:
        """Each tensor's sum of squares, as `cpu.combine` computes a tensor's below SMALL_NORMS elements."""
        return sq_sums(x, self._starts, self.scratch)

    def _nonfinite(self, out: torch.Tensor, stats: list[Stats]) -> None:
        for chunk, st in zip(torch.split(out, self.sizes), stats):
            if not (math.isfinite(st.cp_sq) and math.isfinite(st.update_sq)):
                _count_nonfinite(chunk, st)


def _count_nonfinite(chunk: torch.Tensor, stats: Stats) -> None:
    """The exact NaN/Inf counts of a tensor's output, its NaNs written as the canonical quiet NaN (as `combine`)."""
    nan = torch.isnan(chunk)
    stats.nan += int(nan.sum())
    stats.inf += int(torch.isinf(chunk).sum())
    if stats.nan and chunk.dtype in CANONICAL_NAN:
        bits, canonical = CANONICAL_NAN[chunk.dtype]
        chunk.view(bits)[nan] = canonical
