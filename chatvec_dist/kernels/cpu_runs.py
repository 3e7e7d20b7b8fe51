"""The CPU kernel over a run of small tensors laid end to end: one pass of arithmetic for the whole run, then each
tensor's stats from its own slice, exactly as `cpu.combine` computes them for a tensor of one chunk.

Every operation is elementwise (each element rounded as on its own), and each tensor's sums of squares are the
same `torch.dot` over the same values, so the bytes and the stats equal a call of `cpu.combine` per tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..term import Term
from .cpu import CANONICAL_NAN, CHUNK, Scratch, _delta
from .stats import Stats


def combine_run(
    out: torch.Tensor,
    cp: torch.Tensor | None,
    terms: Sequence[Term],
    compute: torch.dtype,
    scratch: Scratch,
    bounds: Sequence[int],
) -> list[Stats]:
    """`out = round(cp + Σ alpha·(plus − minus))` over tensors laid end to end (tensor i: elements
    [bounds[i], bounds[i + 1])), at most CHUNK elements in all and at least one term; each tensor's Stats."""
    n = out.numel()
    assert terms and n == bounds[-1] <= CHUNK
    acc_buf, tmp_buf, cp_buf = scratch.get(compute)
    acc, tmp = acc_buf[:n], tmp_buf[:n]
    _delta(acc, tmp, terms, 0, n, None, Stats())
    spans = list(zip(bounds[:-1], bounds[1:]))
    stats = [Stats(delta_sq=float(torch.dot(acc[s:e], acc[s:e]))) for s, e in spans]
    if cp is None:
        out.copy_(acc)
        tmp.copy_(out)
    else:
        c = cp_buf[:n]
        c.copy_(cp)
        for st, (s, e) in zip(stats, spans):
            st.cp_sq = float(torch.dot(c[s:e], c[s:e]))
        acc.add_(c)
        out.copy_(acc)
        tmp.copy_(out)
        tmp.sub_(c)
    for st, (s, e) in zip(stats, spans):
        st.update_sq = float(torch.dot(tmp[s:e], tmp[s:e]))
        if not (math.isfinite(st.cp_sq) and math.isfinite(st.update_sq)):
            _count_nonfinite(out[s:e], st)
    return stats


def _count_nonfinite(chunk: torch.Tensor, stats: Stats) -> None:
    """The exact NaN/Inf counts of a tensor's output, its NaNs written as the canonical quiet NaN (as `combine`)."""
    nan = torch.isnan(chunk)
    stats.nan += int(nan.sum())
    stats.inf += int(torch.isinf(chunk).sum())
    if stats.nan and chunk.dtype in CANONICAL_NAN:
        bits, canonical = CANONICAL_NAN[chunk.dtype]
        chunk.view(bits)[nan] = canonical
