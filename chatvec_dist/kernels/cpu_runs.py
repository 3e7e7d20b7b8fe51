"""The CPU kernel over a run of small tensors laid end to end: one pass of arithmetic for the whole run, then each
tensor's stats from its own slice, exactly as `cpu.combine` computes them for a tensor of one chunk.

Every operation is elementwise (each element rounded as on its own), and each tensor's sums of squares are
`cpu.sq_sums` of the same values (one numpy call for the whole run, a sum per tensor that depends on its values
alone), so the bytes and the stats equal a call of `cpu.combine` per tensor.

The outputs of a batch share the work that does not depend on them: each vector's plus − minus once per set of
vectors and compute dtype, CP in the compute dtype (and its sums) once per CP and compute dtype. Outputs that
differ in their alphas alone (an alpha sweep) are rows of one (rows, n) computation: each operation once for all
of them, `alpha · (plus − minus)` row by row as `cpu.combine` computes it for one output (a float32 alpha where
the compute dtype is float32, as torch rounds a Python float multiplying a float32 tensor; × 1 skipped)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from .cpu import CANONICAL_NAN, CHUNK, Scratch, sq_sums
from .stats import Stats

Computed = tuple[torch.Tensor, list[float]]  # values in the compute dtype (a row per output), each tensor's sums
Vector = tuple[torch.Tensor, torch.Tensor | None]  # plus and minus (None: an extracted vector)
Alphas = tuple[float, ...]  # one output's alpha per vector


class RunKernel:
    """`out[j] = round(cp + Σ alphas[j][i]·(plus_i − minus_i))` over one run of tensors (tensor k: `sizes[k]`
    elements), at most CHUNK elements in all, for up to `rows` outputs (rows j) at once: rows · n ≤ CHUNK, so Δ and
    the outputs fill one chunk buffer. Differences, Δ and CP kept in the scratch buffers for the next outputs."""

    def __init__(self, scratch: Scratch, sizes: list[int]) -> None:
        self.scratch = scratch
        self.sizes = sizes
        self.n = sum(sizes)
        assert 0 < self.n <= CHUNK
        self.rows = CHUNK // self.n
        self._diffs: dict[torch.dtype, tuple[Hashable, list[torch.Tensor]]] = {}  # per compute dtype: key, plus − minus
        self._deltas: dict[torch.dtype, tuple[Hashable, Computed]] = {}  # per compute dtype: key and alphas, Δ
        self._cps: dict[torch.dtype, tuple[Hashable, Computed]] = {}
        self._starts = np.cumsum([0, *sizes[:-1]], dtype=np.intp)  # each tensor's first element
        self._row_starts: dict[int, np.ndarray] = {}  # per row count: each row's tensors' first elements

    def delta(
        self, key: Hashable, vectors: Sequence[Vector], alphas: Sequence[Alphas], compute: torch.dtype
    ) -> Computed:
        """Row j: Σ alphas[j][i]·(plus_i − minus_i) (at least one vector); and each row's tensors' sums, row by row.
        `key` names the vectors: equal keys, equal differences; equal keys and alphas, equal Δ."""
        held = self._deltas.get(compute)
        if held is not None and held[0] == (key, alphas):
            return held[1]
        assert 0 < len(alphas) <= self.rows
        diffs = self._differences(key, vectors, compute)
        acc_buf, tmp_buf, _ = self.scratch.get(compute)
        size = len(alphas) * self.n
        acc, tmp = acc_buf[:size].view(-1, self.n), tmp_buf[:size].view(-1, self.n)
        for i, diff in enumerate(diffs):
            _scale(acc if i == 0 else tmp, diff, [row[i] for row in alphas])
            if i:
                acc.add_(tmp)
        done = (acc, self._sums(acc))
        self._deltas[compute] = ((key, alphas), done)
        return done

    def _differences(self, key: Hashable, vectors: Sequence[Vector], compute: torch.dtype) -> list[torch.Tensor]:
        """Each vector's plus − minus in the compute dtype (plus where minus is None), as `cpu._delta` has it."""
        held = self._diffs.get(compute)
        if held is not None and held[0] == key:
            return held[1]
        diffs = [b[: self.n] for b in self.scratch.per_term(compute, len(vectors))]
        for diff, (plus, minus) in zip(diffs, vectors):
            diff.copy_(plus)
            if minus is not None:
                diff.sub_(minus)
        self._diffs[compute] = (key, diffs)
        return diffs

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

    def combine(self, out: torch.Tensor, delta: Computed, cp: Computed | None) -> list[list[Stats]]:
        """Write `out` (rows, n), a row per row of Δ (`delta` and `cp` in the same compute dtype); each row's
        tensors' Stats."""
        acc, delta_sq = delta
        tmp = self.scratch.get(acc.dtype)[1][: acc.numel()].view(acc.shape)
        if cp is None:
            out.copy_(acc)
            tmp.copy_(out)
            cp_sq: Sequence[float] = [0.0] * len(self.sizes)
        else:
            c, cp_sq = cp
            torch.add(acc, c, out=tmp)  # acc + c as `acc.add_(c)` rounds it; Δ stays for the next outputs
            out.copy_(tmp)
            tmp.copy_(out)
            tmp.sub_(c)
        update_sq = self._sums(tmp)
        m, cp_total = len(self.sizes), sum(cp_sq)
        rows = []
        for j in range(len(acc)):
            mine = update_sq[j * m : (j + 1) * m]
            stats = list(map(Stats, cp_sq, delta_sq[j * m : (j + 1) * m], mine))
            if not math.isfinite(cp_total + sum(mine)):  # a NaN or an Inf somewhere (or a large sum)
                self._nonfinite(out[j], stats)
            rows.append(stats)
        return rows

    def _sums(self, x: torch.Tensor) -> list[float]:
        """Each tensor's sum of squares (row by row), as `cpu.combine` computes a tensor's below SMALL_NORMS
        elements."""
        if x.dim() == 1:
            return sq_sums(x, self._starts, self.scratch)
        starts = self._row_starts.get(len(x))
        if starts is None:
            starts = self._row_starts[len(x)] = np.concatenate([self._starts + j * self.n for j in range(len(x))])
        return sq_sums(x.view(-1), starts, self.scratch)

    def _nonfinite(self, out: torch.Tensor, stats: list[Stats]) -> None:
        for chunk, st in zip(torch.split(out, self.sizes), stats):
            if not (math.isfinite(st.cp_sq) and math.isfinite(st.update_sq)):
                _count_nonfinite(chunk, st)


def _scale(dst: torch.Tensor, diff: torch.Tensor, alphas: list[float]) -> None:
    """dst[j] = alphas[j] · diff, rounded as `diff.mul_(alphas[j])` (a row whose alpha is 1: diff itself)."""
    if len(alphas) == 1:
        if alphas[0] != 1.0:
            torch.mul(diff, alphas[0], out=dst[0])
        else:
            dst[0].copy_(diff)
        return
    torch.mul(diff, torch.tensor(alphas, dtype=diff.dtype).view(-1, 1), out=dst)
    for j, alpha in enumerate(alphas):
        if alpha == 1.0:
            dst[j].copy_(diff)


def _count_nonfinite(chunk: torch.Tensor, stats: Stats) -> None:
    """The exact NaN/Inf counts of a tensor's output, its NaNs written as the canonical quiet NaN (as `combine`)."""
    nan = torch.isnan(chunk)
    stats.nan += int(nan.sum())
    stats.inf += int(torch.isinf(chunk).sum())
    if stats.nan and chunk.dtype in CANONICAL_NAN:
        bits, canonical = CANONICAL_NAN[chunk.dtype]
        chunk.view(bits)[nan] = canonical
