"""Runs of small tensors: consecutive whole tensors of a unit whose sources lie end to end in the same files,
combined the same way, done as one: one read per source, one kernel pass, and per tensor only its hashes, its
stats and its write. Bytes, block digests, source digests and stats equal those of doing each tensor alone.

A worker costs a few hundred microseconds per tensor done alone (reads, kernel calls, hashing, bookkeeping): on a
model of 45 000 tensors, most of them small (norms, biases, thin shapes), that is most of the run."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
import xxhash

from ..dtypes import ITEMSIZE
from ..errors import ChatvecError
from ..io import s3
from ..io.ranges import write_at
from ..kernels.cpu import CHUNK
from ..kernels.cpu_runs import combine_run
from ..planning.fp8 import is_fp8
from ..planning.layout import Piece, Placed
from ..planning.planner import PlannedTensor, Src
from ..term import Term
from ..torch_dtypes import TORCH_DTYPES, compute_dtype
from .compute import CpuCompute
from .messages import SegmentResult, Stages, WorkContext
from .source_digests import Blocks, source_block_elems

if TYPE_CHECKING:
    from .worker import UnitRunner

SMALL_BYTES = 64 * 1024  # a tensor at most this large (output and each source) may join a run

Slot = int  # a run's distinct sources, numbered as each tensor's `srcs` first name them
# per output: its dtype, its CP's slot, each term's (alpha, plus slot, minus slot), each of its `srcs`' slot
Shape = tuple[tuple[str, Slot | None, tuple[tuple[float, Slot, Slot | None], ...], tuple[Slot, ...]], ...]


class _Member(NamedTuple):
    piece: Piece
    columns: list[Placed]  # the tensor in each output
    srcs: list[Src]  # its distinct sources, by slot


class Run(NamedTuple):
    """Two or more small tensors, end to end in every source, each output's combined in the same way."""

    members: list[_Member]
    shape: Shape


def _member(piece: Piece, ctx: WorkContext) -> tuple[_Member, Shape] | None:
    """A piece that may join a run (a whole small tensor, merged from plain local sources), and how it is
    combined; None if it is done alone."""
    columns = [out.tensors[piece.index] for out in ctx.outputs]
    slots: dict[Src, Slot] = {}
    shape = []
    for placed in columns:
        t = placed.tensor
        srcs = t.srcs
        if not _small(t, srcs, piece, ctx.block_bytes):
            return None
        for src in srcs:
            slots.setdefault(src, len(slots))
        cp = slots[t.cp] if t.cp is not None else None
        terms = tuple((a, slots[p], slots[m] if m is not None else None) for a, p, m in t.terms)
        shape.append((t.out_dtype, cp, terms, tuple(slots[s] for s in srcs)))
    return _Member(piece, columns, list(slots)), tuple(shape)


def _small(t: PlannedTensor, srcs: tuple[Src, ...], piece: Piece, block_bytes: int) -> bool:
    """A whole tensor of one hash block (of the output and of each source), combined by the plain kernel."""
    if t.rule != "merge" or not t.terms or t.merge_elems != t.numel or piece.first or not _plain(t):
        return False
    if piece.last != t.numel or not 0 < t.numel <= source_block_elems(block_bytes) or is_fp8(t.out_dtype):
        return False  # an FP8 output: its blocks and scales together (planning/fp8.py)
    size = ITEMSIZE[t.out_dtype]
    for s in srcs:  # plain local tensors: no fused experts' segments, no FP8 scales, no object
        if s.segments or s.scale is not None or s.path.startswith(s3.SCHEME):
            return False
        size = max(size, ITEMSIZE[s.dtype])
    return t.numel * size <= SMALL_BYTES


# The fields of a plain merge; any other (token rows, and whatever a later rule adds) at its default, or the
# tensor is done alone: a new field never slips into a run unnoticed.
_PLAIN = {"name", "rule", "reason", "shape", "out_dtype", "cp", "terms", "merge_elems"}
_OTHERS = [(f.name, f.default) for f in dataclasses.fields(PlannedTensor) if f.name not in _PLAIN]


def _plain(t: PlannedTensor) -> bool:
    return all(getattr(t, name) == default for name, default in _OTHERS)


def _follows(prev: _Member, nxt: _Member) -> bool:
    """Whether each of `nxt`'s sources starts where the same slot's source of `prev` ends, in the same file."""
    n = prev.piece.last
    return all(
        a.path == b.path and a.dtype == b.dtype and b.start == a.start + n * ITEMSIZE[a.dtype]
        for a, b in zip(prev.srcs, nxt.srcs)
    )


def runs(pieces: tuple[Piece, ...], ctx: WorkContext) -> Iterator[Piece | Run]:
    """The unit's pieces in order: runs of small tensors (at most a kernel chunk in all), and pieces done alone."""
    members: list[_Member] = []
    shape: Shape = ()
    total = 0
    for piece in pieces:
        found = _member(piece, ctx)
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
    bounds = [0]
    for m in members:
        bounds.append(bounds[-1] + m.piece.last)
    inputs = _read(runner, members, bounds[-1], stages)
    clock = stages.lap("read", clock)
    digests = _source_digests(inputs, bounds)
    clock = stages.lap("hash", clock)
    results: list[list[SegmentResult]] = [[] for _ in members]
    assert isinstance(runner.compute, CpuCompute)
    for o, (out_dtype, cp_slot, term_slots, src_slots) in enumerate(run.shape):
        out = runner._buffer("out", bounds[-1] * ITEMSIZE[out_dtype])
        terms = [Term(a, inputs[p], inputs[m] if m is not None else None) for a, p, m in term_slots]
        cp = inputs[cp_slot] if cp_slot is not None else None
        compute = compute_dtype([out_dtype] + [members[0].srcs[k].dtype for k in src_slots])
        stats = combine_run(out.view(TORCH_DTYPES[out_dtype]), cp, terms, compute, runner.compute.scratch, bounds)
        clock = stages.lap("compute", clock)
        blocks = _hash_and_write(runner, o, members, out, bounds, stages)
        clock = time.perf_counter()
        for i, m in enumerate(members):
            sources = tuple(digests[i][k] for k in src_slots)
            results[i].append(SegmentResult(o, m.piece.index, blocks[i], stats[i], sources))
    return [r for per in results for r in per]


def _read(runner: UnitRunner, run: list[_Member], count: int, stages: Stages) -> list[torch.Tensor]:
    """Each source slot's bytes for the whole run, in one read (its tensors lie end to end)."""
    inputs = []
    for k, src in enumerate(run[0].srcs):
        nbytes = count * ITEMSIZE[src.dtype]
        buf = runner._buffer(("in", k), nbytes)
        try:
            runner._read(src.path, src.start, buf.numpy().data, run[0].columns[0].tensor.name)
        except ChatvecError:  # name the tensor whose bytes are missing: read each member's own
            for m in run:
                s = m.srcs[k]
                runner._read(
                    s.path, s.start, buf.numpy().data[: m.piece.last * ITEMSIZE[s.dtype]], m.columns[0].tensor.name
                )
            raise
        stages.bytes_read += nbytes
        inputs.append(buf.view(TORCH_DTYPES[src.dtype]))
    return inputs


def _source_digests(inputs: list[torch.Tensor], bounds: list[int]) -> list[list[Blocks]]:
    """Per member, each source slot's one source hash block's digest (source_digests.py)."""
    raw = [(x.view(torch.uint8).numpy().data, x.element_size()) for x in inputs]
    return [
        [((0, xxhash.xxh3_128_digest(data[s * size : e * size])),) for data, size in raw]
        for s, e in zip(bounds, bounds[1:])
    ]


def _hash_and_write(
    runner: UnitRunner, o: int, run: list[_Member], out: torch.Tensor, bounds: list[int], stages: Stages
) -> list[Blocks]:
    """Each member's one output hash block, and its bytes written: stretches that lie end to end in one shard in
    one write (an s3:// output: copied into the unit's part)."""
    clock = time.perf_counter()
    size, data = out.numel() // bounds[-1], out.numpy().data
    cuts = [b * size for b in bounds]
    blocks: list[Blocks] = [((0, xxhash.xxh3_128_digest(data[s:e])),) for s, e in zip(cuts, cuts[1:])]
    clock = stages.lap("hash", clock)
    placed = [m.columns[o] for m in run]
    if o in runner._staged:  # an s3:// output: each tensor into the part that holds it
        for p, s, e in zip(placed, cuts, cuts[1:]):
            runner._copy_to_part(o, p.shard, p.offset, data[s:e])
    else:
        first = 0
        for i in range(1, len(run) + 1):
            if i < len(run) and placed[i].shard == placed[i - 1].shard and placed[i].offset == _end(placed[i - 1]):
                continue
            path = runner.ctx.outputs[o].shard_paths[placed[first].shard]
            fd = runner.files.get(path, os.O_WRONLY)
            write_at(fd, data[cuts[first] : cuts[i]], placed[first].offset, path)
            first = i
    stages.bytes_written += len(data)
    stages.lap("write", clock)
    return blocks


def _end(p: Placed) -> int:
    return p.offset + p.nbytes
