"""A worker's share of TIES' pre-pass: histograms of each vector's |Δ| bit patterns over a unit's pieces of the
selected tensors (planning/kth.py), a strip at a time; nothing is written."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..kernels.sparse import keep_mask, magnitude_bits
from ..planning.kth import HIGH_BUCKETS, LOW_BITS, LOW_BUCKETS, Histogram, SelectTensor
from ..planning.layout import Piece, Unit
from ..planning.planner import PlannedTensor
from ..term import Term
from .messages import Stages, UnitResult

if TYPE_CHECKING:
    from .worker import UnitRunner

STRIP = 1 << 20  # elements per step: the deltas stay small
WIDE = ("F32", "F64")  # vectors the merge computes in float64; 16-bit ones: in float32, as it usually does


def select_unit(runner: UnitRunner, unit: Unit) -> UnitResult:
    """Histogram the unit's pieces of the selected tensors: one list of Histograms per such piece."""
    t0, stages = time.perf_counter(), Stages()
    select = runner.ctx.select
    assert select is not None
    found = []
    for piece in unit.pieces:
        spec = select.tensors.get(piece.index)
        if spec is not None:
            found.append((piece.index, _piece(runner, piece, spec, stages)))
    return UnitResult(unit.id, [], runner.worker, runner.node, time.perf_counter() - t0, stages, histograms=found)


def _piece(runner: UnitRunner, piece: Piece, spec: SelectTensor, stages: Stages) -> list[Histogram]:
    last = min(piece.last, spec.merge_elems)
    totals: dict[tuple[int, int], torch.Tensor] = {}
    terms = tuple(Term(1.0, p, m) for p, m in spec.terms)
    tensor = PlannedTensor(spec.name, "merge", "", (spec.merge_elems,), "F32", None, terms, spec.merge_elems)
    runner.plan_reads(Piece(piece.index, piece.first, last), [tensor])
    for first in range(piece.first, last, STRIP):
        strip = Piece(piece.index, first, min(first + STRIP, last))
        clock = time.perf_counter()
        inputs = runner._read_inputs(strip, [tensor])
        stages.bytes_read += sum(t.numel() * t.element_size() for t in inputs.values())
        clock = stages.lap("read", clock)
        n = strip.last - strip.first
        for i, (plus, minus) in enumerate(spec.terms):
            wide = any(src.dtype in WIDE for src in (plus, minus) if src is not None)
            d = inputs[plus][:n].to(torch.float64 if wide else torch.float32)
            if minus is not None:
                d = d - inputs[minus][:n]
            dare = spec.dare[i]
            if dare is not None:
                d.masked_fill_(~keep_mask(dare, strip.first, n), 0.0)
            _count(totals, i, magnitude_bits(d), spec)
        stages.lap("compute", clock)
    return [
        Histogram(piece.index, term, bucket, nz.to(torch.int32).numpy(), counts[nz].numpy())
        for (term, bucket), counts in totals.items()
        for nz in [counts.nonzero().flatten()]
    ]


def _count(totals: dict[tuple[int, int], torch.Tensor], term: int, bits: torch.Tensor, spec: SelectTensor) -> None:
    """Pass 1: the high bits' counts; pass 2: the low bits' counts within each asked-for high bucket."""
    high = bits >> LOW_BITS
    if spec.buckets is None:
        counts = torch.bincount(high, minlength=HIGH_BUCKETS)
        _add(totals, (term, -1), counts)
        return
    for bucket in spec.buckets[term]:
        low = bits[high == bucket] & (LOW_BUCKETS - 1)
        _add(totals, (term, bucket), torch.bincount(low, minlength=LOW_BUCKETS))


def _add(totals: dict[tuple[int, int], torch.Tensor], key: tuple[int, int], counts: torch.Tensor) -> None:
    if key in totals:
        totals[key] += counts
    else:
        totals[key] = counts
