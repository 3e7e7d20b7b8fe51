"""TIES' pre-pass: each TIES tensor's per-vector magnitude threshold (the exact k-th largest |Δ|, planning/kth.py)
needs the whole tensor before any unit of it is merged. Two passes over the units holding such tensors, through
the run's own backend (the same workers, reads and retries as the merge), each worker returning small histograms
instead of writing; the driver merges them and drops each tensor's as soon as its last piece is in."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .exec.backend import make_backend
from .exec.messages import UnitResult, WorkContext
from .io.s3_checkpoint import object_etags
from .io.sources import hub_files
from .log import logger
from .planning.kth import HIGH_BUCKETS, LOW_BUCKETS, Accumulator, SelectPass, SelectTensor, from_top, threshold
from .planning.layout import Placed, Unit
from .planning.plan import Planned
from .planning.planner import PlannedTensor
from .recipe.spec import RunOptions

if TYPE_CHECKING:
    from .job import Output

Ranks = dict[tuple[int, int, int], tuple[int, int]]  # (tensor, vector, keep) → (high bucket, rank in it)


def find_thresholds(planned: Planned, outputs: list[Output], todo: list[Unit], options: RunOptions) -> float:
    """Give every output's TIES tensors that a unit still to do holds their magnitude thresholds; returns the
    seconds it took (0 where none is needed)."""
    wanted = _wanted(outputs, todo)
    if not wanted:
        return 0.0
    started = time.perf_counter()
    units = [u for u in planned.units if any(p.index in wanted for p in u.pieces)]
    pieces = Counter(p.index for u in units for p in u.pieces if p.index in wanted)
    specs = {
        i: SelectTensor(t.name, tuple((p, m) for _, p, m in t.terms), t.dare or (None,) * len(t.terms), t.merge_elems)
        for i, (t, _) in wanted.items()
    }
    ranks: Ranks = {}

    def on_high(index: int, totals: dict[tuple[int, int], np.ndarray]) -> None:
        for term in range(len(specs[index].terms)):
            counts = totals.get((term, -1), np.zeros(HIGH_BUCKETS, dtype=np.int64))
            for keep in wanted[index][1]:
                ranks[(index, term, keep)] = from_top(counts, keep)

    _pass(planned, outputs, units, specs, pieces, HIGH_BUCKETS, options, on_high)
    specs = {
        i: dataclasses.replace(
            spec,
            buckets=tuple(tuple(sorted({ranks[(i, t, k)][0] for k in wanted[i][1]})) for t in range(len(spec.terms))),
        )
        for i, spec in specs.items()
    }
    found: dict[tuple[int, int, int], int] = {}

    def on_low(index: int, totals: dict[tuple[int, int], np.ndarray]) -> None:
        for term in range(len(specs[index].terms)):
            for keep in wanted[index][1]:
                bucket, rank = ranks[(index, term, keep)]
                found[(index, term, keep)] = threshold(bucket, totals[(term, bucket)], rank)

    _pass(planned, outputs, units, specs, pieces, LOW_BUCKETS, options, on_low)
    for output in outputs:
        tensors = [_with_thresholds(i, p, found) for i, p in enumerate(output.plan.layout.tensors)]
        output.plan = dataclasses.replace(output.plan, layout=dataclasses.replace(output.plan.layout, tensors=tensors))
    seconds = time.perf_counter() - started
    logger.info(
        f"TIES pre-pass: {len(wanted)} tensors' thresholds from {len(units)} units, two passes, {seconds:.1f} s"
    )
    return seconds


def _wanted(outputs: list[Output], todo: list[Unit]) -> dict[int, tuple[PlannedTensor, set[int]]]:
    """The TIES tensors still to merge without thresholds, by layout index: one output's tensor (its vectors are
    every output's) and each output's trim size."""
    left = {p.index for u in todo for p in u.pieces}
    wanted: dict[int, tuple[PlannedTensor, set[int]]] = {}
    for output in outputs:
        for i, placed in enumerate(output.plan.layout.tensors):
            t = placed.tensor
            if i in left and t.ties is not None and t.ties.thresholds is None:
                first, keeps = wanted.setdefault(i, (t, set()))
                # the same vectors in every output; alphas may differ (a sweep): thresholds are of |Δ|, not alpha·Δ
                same = [(p, m) for _, p, m in first.terms] == [(p, m) for _, p, m in t.terms]
                assert same and (first.dare, first.merge_elems) == (t.dare, t.merge_elems), t.name
                keeps.add(t.ties.keep)
    return wanted


def _pass(
    planned: Planned,
    outputs: list[Output],
    units: list[Unit],
    specs: dict[int, SelectTensor],
    pieces: Counter[int],
    size: int,
    options: RunOptions,
    finish: Callable[[int, dict[tuple[int, int], np.ndarray]], None],
) -> None:
    """One histogram pass over `units`; `finish(tensor, totals)` as soon as a tensor's last piece is counted."""
    inputs = [c for o in outputs for c in o.plan.sources.checkpoints]
    contexts = [o.context() for o in outputs]
    ctx = WorkContext(contexts, planned.block_bytes, hub_files(inputs), object_etags(inputs), select=SelectPass(specs))
    backend = make_backend(ctx, options)
    counts = Accumulator(dict(pieces), size)

    def on_result(result: UnitResult) -> None:
        for index, hists in result.histograms:
            done = counts.add(index, hists)
            if done is not None:
                finish(index, done)

    try:
        backend.run(units, on_result)
    finally:
        backend.close()


def _with_thresholds(index: int, placed: Placed, found: dict[tuple[int, int, int], int]) -> Placed:
    t = placed.tensor
    if t.ties is None or t.ties.thresholds is not None or (index, 0, t.ties.keep) not in found:
        return placed
    thresholds = tuple(found[(index, term, t.ties.keep)] for term in range(len(t.terms)))
    ties = dataclasses.replace(t.ties, thresholds=thresholds)
    return dataclasses.replace(placed, tensor=dataclasses.replace(t, ties=ties))
