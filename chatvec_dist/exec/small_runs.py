"""Runs of small tensors: consecutive whole tensors of a unit whose sources lie end to end in the same files,
combined the same way, done as one: one read per source, one kernel pass, and per tensor only its hashes, its
stats and its write. Bytes, block digests, source digests and stats equal those of doing each tensor alone.

A worker costs a few hundred microseconds per tensor done alone (reads, kernel calls, hashing, bookkeeping): on a
model of 45 000 tensors, most of them small (norms, biases, thin shapes), that is most of the run. In a run, the
per-tensor work is a few calls over lists (torch.split, map), not Python loops, and the outputs of a batch share
what does not depend on them: the reads and source digests, Δ for equal terms, CP for an equal CP, and all of it
(bytes, digests, stats) for outputs combined alike."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Sequence
from itertools import accumulate, groupby, repeat
from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

import torch
import xxhash

from ..dtypes import ITEMSIZE
from ..errors import ChatvecError
from ..io import s3
from ..io.ranges import write_at
from ..kernels.cpu import CHUNK, SMALL_NORMS
from ..kernels.cpu_runs import RunKernel
from ..kernels.stats import Stats
from ..planning.fp8 import is_fp8
from ..planning.layout import Piece, Placed
from ..planning.planner import PlannedTensor, Src
from ..term import Term
from ..torch_dtypes import TORCH_DTYPES, compute_dtype
from .compute import CpuCompute
from .messages import OutputContext, SegmentResult, Stages, WorkContext
from .source_digests import Blocks, source_block_elems

if TYPE_CHECKING:
    from .worker import UnitRunner

SMALL_BYTES = 64 * 1024  # a tensor at most this large (output and each source) may join a run
assert SMALL_BYTES // 2 < SMALL_NORMS  # a member's norms: `cpu.sq_sums`, as the kernel sums it alone

Slot = int  # a run's distinct sources, numbered as each tensor's `srcs` first name them
Terms = tuple[tuple[float, Slot, Slot | None], ...]  # each term's (alpha, plus slot, minus slot)
Column = tuple[str, Slot | None, Terms]  # an output's dtype, its CP's slot, its terms
Shape = tuple[Column, ...]  # per output


Source = tuple[str, int, str]  # a plain source tensor: its file, byte offset and dtype


class _Member(NamedTuple):
    piece: Piece
    columns: list[Placed]  # the tensor in each output
    srcs: list[Source]  # its distinct sources, by slot


class Run(NamedTuple):
    """Two or more small tensors, end to end in every source, each output's combined in the same way."""

    members: list[_Member]
    shape: Shape


class _Alone(Exception):
    """The tensor is done alone."""


class _Slots:
    """A tensor's distinct sources across the outputs, numbered in order of first use; each a plain local tensor
    (no fused experts' segments, no FP8 scales, no object) of at most SMALL_BYTES."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.slots: dict[Source, Slot] = {}

    def of(self, src: Src) -> Slot:
        if src.segments or src.scale is not None:
            raise _Alone
        key = (src.path, src.start, src.dtype)
        slot = self.slots.get(key)
        if slot is None:
            if src.path.startswith(s3.SCHEME) or self.numel * ITEMSIZE[src.dtype] > SMALL_BYTES:
                raise _Alone
            slot = self.slots[key] = len(self.slots)
        return slot


def _member(piece: Piece, outputs: list[OutputContext], block_elems: int) -> tuple[_Member, Shape] | None:
    """A piece that may join a run (a whole small tensor of one hash block, of the output and of each source,
    merged by the plain kernel from plain local sources), and how it is combined; None if it is done alone."""
    n = piece.last
    if piece.first or not 0 < n <= block_elems:
        return None
    columns = [out.tensors[piece.index] for out in outputs]
    slots = _Slots(n)
    try:
        shape = tuple([_column(p.tensor, n, slots) for p in columns])
    except _Alone:
        return None
    return _Member(piece, columns, list(slots.slots)), shape


def _column(t: PlannedTensor, n: int, slots: _Slots) -> Column:
    """How one output's tensor of `n` elements is combined, its sources numbered in `slots`."""
    if t.rule != "merge" or not t.terms or t.merge_elems != n or _others(t) != _DEFAULTS:
        raise _Alone
    if math.prod(t.shape) != n or is_fp8(t.out_dtype) or n * ITEMSIZE[t.out_dtype] > SMALL_BYTES:
        raise _Alone  # an FP8 output: its blocks and scales together (planning/fp8.py)
    of, terms = slots.of, []
    cp = of(t.cp) if t.cp is not None else None
    for alpha, plus, minus in t.terms:
        if alpha == 0 and math.copysign(1.0, alpha) < 0:
            raise _Alone  # −0.0 equals 0.0 but may give other bytes: runs and batches group by equal alphas
        terms.append((alpha, of(plus), of(minus) if minus is not None else None))
    return t.out_dtype, cp, tuple(terms)


def _order(column: Column) -> list[Slot]:
    """The slots of the column's tensor's `srcs`: CP's, then each term's plus and minus."""
    _, cp, terms = column
    return ([cp] if cp is not None else []) + [s for _, p, m in terms for s in (p, m) if s is not None]


# The fields of a plain merge; any other (token rows, and whatever a later rule adds) at its default, or the
# tensor is done alone: a new field never slips into a run unnoticed.
_PLAIN = {"name", "rule", "reason", "shape", "out_dtype", "cp", "terms", "merge_elems"}
_OTHERS = [(f.name, f.default) for f in dataclasses.fields(PlannedTensor) if f.name not in _PLAIN]
_others = attrgetter(*(name for name, _ in _OTHERS))  # a tuple of them (with two or more)
_DEFAULTS = tuple(default for _, default in _OTHERS)


def _follows(prev: _Member, nxt: _Member) -> bool:
    """Whether each of `nxt`'s sources starts where the same slot's source of `prev` ends, in the same file."""
    n = prev.piece.last
    return nxt.srcs == [(path, start + n * ITEMSIZE[dtype], dtype) for path, start, dtype in prev.srcs]


def runs(pieces: tuple[Piece, ...], ctx: WorkContext) -> Iterator[Piece | Run]:
    """The unit's pieces in order: runs of small tensors (at most a kernel chunk in all), and pieces done alone."""
    block_elems = source_block_elems(ctx.block_bytes)
    members: list[_Member] = []
    shape: Shape = ()
    total = 0
    for piece in pieces:
        found = _member(piece, ctx.outputs, block_elems)
        joins = found is not None and members and found[1] == shape and total + piece.last <= CHUNK
        if joins and found is not None and _follows(members[-1], found[0]):
            members.append(found[0])
            total += piece.last
            continue
        yield from _flush(members, shape)
        members, total = [], 0
        if found is None:
            yield piece
        else:
            members, shape, total = [found[0]], found[1], piece.last
    yield from _flush(members, shape)


def _flush(members: list[_Member], shape: Shape) -> Iterator[Piece | Run]:
    if len(members) > 1:
        yield Run(members, shape)
    elif members:
        yield members[0].piece


def do_run(runner: UnitRunner, run: Run, stages: Stages) -> list[SegmentResult]:
    """Read, combine, hash and write a run of small tensors (see the module's docstring)."""
    clock = time.perf_counter()
    members = run.members
    sizes = [m.piece.last for m in members]
    cuts = list(accumulate(sizes, initial=0))
    inputs = _read(runner, members, cuts[-1], stages)
    clock = stages.lap("read", clock)
    digests = [_blocks(x, cuts) for x in inputs]  # per slot, each member's one source hash block (source_digests)
    clock = stages.lap("hash", clock)
    assert isinstance(runner.compute, CpuCompute)
    kernel = RunKernel(runner.compute.scratch, sizes)
    indices = [m.piece.index for m in members]
    per_output: list[list[SegmentResult]] = [[] for _ in run.shape]
    shared: dict[tuple[Slot, ...], list[tuple[Blocks, ...]]] = {}  # each member's source digests, by slots
    for column, outputs in _alike(run.shape).items():
        out, stats = _combine(runner, kernel, column, inputs, members[0].srcs)
        clock = stages.lap("compute", clock)
        blocks = _blocks(out, cuts)  # each member's one output hash block
        clock = stages.lap("hash", clock)
        order = tuple(_order(column))
        if order not in shared:
            shared[order] = list(zip(*(digests[k] for k in order)))
        sources = shared[order]
        for o in outputs:
            _write(runner, o, [m.columns[o] for m in members], out, cuts, stages)
            # outputs alike share their Stats objects: a result's stats are read, never changed, after this
            per_output[o] = list(map(SegmentResult, repeat(o), indices, blocks, stats, sources))
        clock = time.perf_counter()
    return [r for per in zip(*per_output) for r in per]  # member by member, as done one at a time


def _alike(shape: Shape) -> dict[Column, list[int]]:
    """The outputs combined alike (equal dtype, CP, alphas and vectors: equal bytes and stats), by column."""
    alike: dict[Column, list[int]] = {}
    for o, column in enumerate(shape):
        alike.setdefault(column, []).append(o)
    return alike


def _combine(
    runner: UnitRunner, kernel: RunKernel, column: Column, inputs: list[torch.Tensor], srcs: list[Source]
) -> tuple[torch.Tensor, list[Stats]]:
    """One column's output bytes for the whole run, and each member's stats."""
    out_dtype, cp_slot, term_slots = column
    compute = compute_dtype([out_dtype] + [srcs[k][2] for k in _order(column)])
    terms = [Term(a, inputs[p], inputs[m] if m is not None else None) for a, p, m in term_slots]
    delta = kernel.delta(term_slots, terms, compute)
    cp = kernel.cp(cp_slot, inputs[cp_slot], compute) if cp_slot is not None else None
    out = runner._buffer("out", kernel.n * ITEMSIZE[out_dtype]).view(TORCH_DTYPES[out_dtype])
    return out, kernel.combine(out, delta, cp)


def _read(runner: UnitRunner, run: list[_Member], count: int, stages: Stages) -> list[torch.Tensor]:
    """Each source slot's bytes for the whole run, in one read (its tensors lie end to end)."""
    inputs = []
    for k, (path, start, dtype) in enumerate(run[0].srcs):
        nbytes = count * ITEMSIZE[dtype]
        buf = runner._buffer(("in", k), nbytes)
        try:
            runner._read(path, start, buf.numpy().data, run[0].columns[0].tensor.name)
        except ChatvecError:  # name the tensor whose bytes are missing: read each member's own
            for m in run:
                at = m.srcs[k][1]
                runner._read(path, at, buf.numpy().data[: m.piece.last * ITEMSIZE[dtype]], m.columns[0].tensor.name)
            raise
        stages.bytes_read += nbytes
        inputs.append(buf.view(TORCH_DTYPES[dtype]))
    return inputs


def _blocks(x: torch.Tensor, cuts: Sequence[int]) -> list[Blocks]:
    """Each member's one hash block's digest: xxh3-128 of its bytes (elements [cuts[i], cuts[i + 1]) of `x`)."""
    size, data = x.element_size(), x.view(torch.uint8).numpy().data
    spans = map(slice, [c * size for c in cuts], [c * size for c in cuts[1:]])
    return [((0, d),) for d in map(xxhash.xxh3_128_digest, map(data.__getitem__, spans))]


def _write(
    runner: UnitRunner, o: int, placed: list[Placed], out: torch.Tensor, cuts: list[int], stages: Stages
) -> None:
    """Write each member's bytes into output `o`: stretches that lie end to end in one shard in one write (an
    s3:// output: copied into the unit's part)."""
    clock = time.perf_counter()
    size, data = out.element_size(), out.view(torch.uint8).numpy().data
    at = [c * size for c in cuts]
    if o in runner._staged:  # an s3:// output: each tensor into the part that holds it
        for p, s, e in zip(placed, at, at[1:]):
            runner._copy_to_part(o, p.shard, p.offset, data[s:e])
    else:
        i = 0  # members lie end to end where their offset less their place in the run is the same
        for (shard, origin), same in groupby([(p.shard, p.offset - a) for p, a in zip(placed, at)]):
            j = i + sum(1 for _ in same)
            path = runner.ctx.outputs[o].shard_paths[shard]
            write_at(runner.files.get(path, os.O_WRONLY), data[at[i] : at[j]], origin + at[i], path)
            i = j
    stages.bytes_written += len(data)
    stages.lap("write", clock)
