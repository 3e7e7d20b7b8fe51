"""Runs of small tensors: consecutive whole tensors of a unit whose sources lie end to end in the same files,
combined the same way, done as one: one read per source, one kernel pass, and per tensor only its hashes, its
stats and its write. Bytes, block digests, source digests and stats equal those of doing each tensor alone.

A worker costs a few hundred microseconds per tensor done alone (reads, kernel calls, hashing, bookkeeping): on a
model of 45 000 tensors, most of them small (norms, biases, thin shapes), that is most of the run. In a run, the
per-tensor work is a few calls over lists (torch.split, map), not Python loops, and the outputs of a batch share
what does not depend on them: the reads and source digests, each vector's difference, CP for an equal CP, and all
of it (bytes, digests, stats) for outputs combined alike. Outputs that differ in their alphas alone (an alpha
sweep) are found per tensor by a few identity checks per output, not each output's column worked out, and are
computed as rows of one kernel pass."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Sequence
from itertools import accumulate, chain, groupby, repeat
from operator import attrgetter, itemgetter, sub
from typing import TYPE_CHECKING, NamedTuple

import torch
import xxhash

from ..dtypes import ITEMSIZE
from ..errors import ChatvecError
from ..io import s3
from ..io.ranges import write_at
from ..kernels.cpu import CHUNK, SMALL_NORMS
from ..kernels.cpu_runs import Alphas, RunKernel
from ..kernels.stats import Stats
from ..planning.fp8 import is_fp8
from ..planning.layout import Piece, Placed
from ..planning.planner import PlannedTensor, Src
from ..quickinit import tuple_maker
from ..torch_dtypes import TORCH_DTYPES, compute_dtype
from .compute import CpuCompute
from .messages import SegmentResult, Stages, WorkContext
from .source_digests import Blocks, source_block_elems

if TYPE_CHECKING:
    from .worker import UnitRunner

SMALL_BYTES = 64 * 1024  # a tensor at most this large (output and each source) may join a run
assert SMALL_BYTES // 2 < SMALL_NORMS  # a member's norms: `cpu.sq_sums`, as the kernel sums it alone

Slot = int  # a run's distinct sources, numbered as each tensor's `srcs` first name them
Terms = tuple[tuple[float, Slot, Slot | None], ...]  # each term's (alpha, plus slot, minus slot)
Column = tuple[str, Slot | None, Terms]  # an output's dtype, its CP's slot, its terms
Shape = tuple[Column, ...]  # per output
Vectors = tuple[tuple[Slot, Slot | None], ...]  # each term's plus and minus slots
Group = tuple[str, Slot | None, Vectors]  # outputs alike but for their alphas: dtype, CP's slot, vectors
# How a tensor is combined in every output (`_member`): equal keys, equal shapes
Key = tuple[Column] | tuple[Column, tuple[Alphas, ...]] | tuple[Column, None, Shape]
Tensors = list[Placed] | dict[int, Placed]  # an output's, by tensor index


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


def _member(piece: Piece, tables: list[Tensors], block_elems: int) -> tuple[_Member, Key] | None:
    """A piece that may join a run (a whole small tensor of one hash block, of the output and of each source,
    merged by the plain kernel from plain local sources), and how it is combined; None if it is done alone."""
    n = piece.last
    if piece.first or not 0 < n <= block_elems:
        return None
    columns = [t[piece.index] for t in tables]
    slots = _Slots(n)
    try:
        first = _column(columns[0].tensor, n, slots)
        key: Key = (first,) if len(columns) == 1 else _others_key(first, columns, n, slots)
    except _Alone:
        return None
    return _Member(piece, columns, list(slots.slots)), key


def _others_key(first: Column, columns: list[Placed], n: int, slots: _Slots) -> Key:
    """The key of a tensor of several outputs: (output 0's column, each output's alphas) in an alpha sweep, else
    (output 0's column, None, each other output's column)."""
    alphas = _sweep(columns)
    if alphas is not None:
        return first, alphas
    return first, None, tuple([_column(p.tensor, n, slots) for p in columns[1:]])


def _sweep(columns: list[Placed]) -> tuple[Alphas, ...] | None:
    """Each output's alphas where the outputs' tensors differ in their alphas alone (an alpha sweep: every other
    field and each vector's sources the very same objects, as planning/reuse.py makes them), no other output's
    0.0 or −0.0 among them, else None. Output 0's column (`_column` took it) holds, then, for every output but for
    its alphas."""
    t0 = columns[0].tensor
    fixed, terms0 = _fixed(t0), t0.terms
    if len(terms0) == 1:  # one vector (a loop of its own: a few bytecodes per output)
        alpha, plus, minus = terms0[0]
        rows = [(alpha,)]
        for placed in columns[1:]:
            t = placed.tensor
            terms = t.terms
            if len(terms) != 1 or _fixed(t) != fixed:
                return None
            alpha, p, m = terms[0]
            if p is not plus or m is not minus or not alpha:  # `not alpha`: ±0.0 (equal), told apart by `_column`
                return None
            rows.append((alpha,))
        return tuple(rows)
    vectors = list(map(_VECTOR, terms0))
    rows = [tuple(map(_ALPHA, terms0))]
    for placed in columns[1:]:
        t = placed.tensor
        if _fixed(t) != fixed or list(map(_VECTOR, t.terms)) != vectors:
            return None
        alphas = tuple(map(_ALPHA, t.terms))
        if 0.0 in alphas:
            return None
        rows.append(alphas)
    return tuple(rows)


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


def _shape(key: Key) -> Shape:
    """Each output's column, from its tensors' key."""
    if len(key) == 1:
        return key
    if len(key) == 3:
        return (key[0], *key[2])
    (out_dtype, cp, terms), alphas = key
    vectors = [(p, m) for _, p, m in terms]
    return tuple((out_dtype, cp, tuple((a, p, m) for a, (p, m) in zip(row, vectors))) for row in alphas)


def _order(cp: Slot | None, vectors: Vectors) -> list[Slot]:
    """The slots of a tensor's `srcs`: CP's, then each term's plus and minus."""
    return ([cp] if cp is not None else []) + [s for p, m in vectors for s in (p, m) if s is not None]


# The fields of a plain merge; any other (token rows, and whatever a later rule adds) at its default, or the
# tensor is done alone: a new field never slips into a run unnoticed.
_PLAIN = {"name", "rule", "reason", "shape", "out_dtype", "cp", "terms", "merge_elems"}
_OTHERS = [(f.name, f.default) for f in dataclasses.fields(PlannedTensor) if f.name not in _PLAIN]
_others = attrgetter(*(name for name, _ in _OTHERS))  # a tuple of them (with two or more)
_DEFAULTS = tuple(default for _, default in _OTHERS)
# The fields `_column` reads, but the terms, and all the others: equal, so is the column but for the alphas
_fixed = attrgetter(*(f.name for f in dataclasses.fields(PlannedTensor) if f.name not in {"name", "reason", "terms"}))
_COLUMNS = attrgetter("columns")
_ALPHA, _VECTOR = itemgetter(0), itemgetter(1, 2)  # of a term
_SHARD, _OFFSET = attrgetter("shard"), attrgetter("offset")
_result = tuple_maker(SegmentResult)


def _follows(prev: _Member, nxt: _Member) -> bool:
    """Whether each of `nxt`'s sources starts where the same slot's source of `prev` ends, in the same file."""
    n = prev.piece.last
    return nxt.srcs == [(path, start + n * ITEMSIZE[dtype], dtype) for path, start, dtype in prev.srcs]


def runs(pieces: tuple[Piece, ...], ctx: WorkContext) -> Iterator[Piece | Run]:
    """The unit's pieces in order: runs of small tensors (at most a kernel chunk in all), and pieces done alone."""
    block_elems = source_block_elems(ctx.block_bytes)
    tables = [out.tensors for out in ctx.outputs]
    members: list[_Member] = []
    key: Key | None = None
    total = 0
    for piece in pieces:
        found = _member(piece, tables, block_elems)
        joins = found is not None and members and found[1] == key and total + piece.last <= CHUNK
        if joins and found is not None and _follows(members[-1], found[0]):
            members.append(found[0])
            total += piece.last
            continue
        yield from _flush(members, key)
        members, total = [], 0
        if found is None:
            yield piece
        else:
            members, key, total = [found[0]], found[1], piece.last
    yield from _flush(members, key)


def _flush(members: list[_Member], key: Key | None) -> Iterator[Piece | Run]:
    if len(members) > 1 and key is not None:
        yield Run(members, _shape(key))
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
    # per slot, each member's one source hash block (source_digests)
    digests = [_blocks(_bytes(x), _spans(_offsets(cuts, x.element_size()))) for x in inputs]
    clock = stages.lap("hash", clock)
    assert isinstance(runner.compute, CpuCompute)
    kernel = RunKernel(runner.compute.scratch, sizes)
    indices = [m.piece.index for m in members]
    writer = _Writer(runner, list(zip(*map(_COLUMNS, members))), stages)
    per_output: list[list[SegmentResult]] = [[] for _ in run.shape]
    shared: dict[tuple[Slot, ...], list[tuple[Blocks, ...]]] = {}  # each member's source digests, by slots
    for group, by_alphas in _groups(run.shape).items():
        order = tuple(_order(group[1], group[2]))
        if order not in shared:
            shared[order] = list(zip(*(digests[k] for k in order)))
        sources = shared[order]
        rows = list(by_alphas.items())
        for b in range(0, len(rows), kernel.rows):
            batch = rows[b : b + kernel.rows]
            clock = time.perf_counter()
            out, stats = _combine(runner, kernel, group, [alphas for alphas, _ in batch], inputs, members[0].srcs)
            clock = stages.lap("compute", clock)
            data, width, size = _bytes(out), out[0].nbytes, out.element_size()
            at = _offsets(cuts, size)
            spans = _spans(at)
            for j, (_, outputs) in enumerate(batch):
                row = data[j * width : (j + 1) * width]
                clock = time.perf_counter()
                blocks = _blocks(row, spans)  # each member's one output hash block
                clock = stages.lap("hash", clock)
                for o in outputs:
                    writer.write(o, row, at, size)
                    # outputs alike share their Stats objects: a result's stats are read, never changed, after this
                    per_output[o] = list(map(_result, zip(repeat(o), indices, blocks, stats[j], sources)))
    return list(chain.from_iterable(zip(*per_output)))  # member by member, as done one at a time


def _groups(shape: Shape) -> dict[Group, dict[Alphas, list[int]]]:
    """The outputs by dtype, CP and vectors (rows of one kernel pass), then by alphas: outputs alike (equal
    alphas too: equal bytes and stats) computed once."""
    groups: dict[Group, dict[Alphas, list[int]]] = {}
    for o, (out_dtype, cp, terms) in enumerate(shape):
        vectors = tuple((p, m) for _, p, m in terms)
        alphas = tuple(a for a, _, _ in terms)
        groups.setdefault((out_dtype, cp, vectors), {}).setdefault(alphas, []).append(o)
    return groups


def _combine(
    runner: UnitRunner,
    kernel: RunKernel,
    group: Group,
    alphas: list[Alphas],
    inputs: list[torch.Tensor],
    srcs: list[Source],
) -> tuple[torch.Tensor, list[list[Stats]]]:
    """The output bytes of the whole run for each row of alphas, (rows, n), and each row's members' stats."""
    out_dtype, cp_slot, vectors = group
    compute = compute_dtype([out_dtype] + [srcs[k][2] for k in _order(cp_slot, vectors)])
    terms = [(inputs[p], inputs[m] if m is not None else None) for p, m in vectors]
    delta = kernel.delta(vectors, terms, tuple(alphas), compute)
    cp = kernel.cp(cp_slot, inputs[cp_slot], compute) if cp_slot is not None else None
    size = len(alphas) * kernel.n
    out = runner._buffer("out", size * ITEMSIZE[out_dtype]).view(TORCH_DTYPES[out_dtype]).view(-1, kernel.n)
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


def _bytes(x: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, flat."""
    return x.view(-1).view(torch.uint8).numpy().data


def _offsets(cuts: list[int], size: int) -> list[int]:
    """Each member's first byte, and the end, for elements of `size` bytes."""
    return [c * size for c in cuts]


def _spans(at: list[int]) -> list[slice]:
    """Each member's bytes: [at[i], at[i + 1])."""
    return list(map(slice, at, at[1:]))


def _blocks(data: memoryview, spans: list[slice]) -> list[Blocks]:
    """Each member's one hash block's digest: xxh3-128 of its bytes, `data[spans[i]]`."""
    digest = xxhash.xxh3_128_digest
    return [((0, digest(data[span])),) for span in spans]


Stretch = tuple[int, int, int, int]  # shard, offset in its file, first and end byte in the run's bytes


class _Writer:
    """Writes a run's members into each output: stretches that lie end to end in one shard in one write (an s3://
    output: each member copied into the unit's part). The stretches are worked out once for the outputs whose
    members have the same places (an alpha sweep's: one layout)."""

    def __init__(self, runner: UnitRunner, placed: list[tuple[Placed, ...]], stages: Stages) -> None:
        self.runner, self.placed, self.stages = runner, placed, stages  # placed: per output, each member's
        self._known: list[tuple[int, list[int], list[int], list[Stretch]]] = []  # size, shards, offsets: stretches

    def write(self, o: int, data: memoryview, at: list[int], size: int) -> None:
        """Write output `o`'s members, `data[at[i]:at[i + 1]]` (elements of `size` bytes)."""
        clock = time.perf_counter()
        runner, placed = self.runner, self.placed[o]
        if o in runner._staged:
            for p, s, e in zip(placed, at, at[1:]):
                runner._copy_to_part(o, p.shard, p.offset, data[s:e])
        else:
            paths = runner.ctx.outputs[o].shard_paths
            for shard, offset, s, e in self._stretches(placed, at, size):
                write_at(runner.files.get(paths[shard], os.O_WRONLY), data[s:e], offset, paths[shard])
        self.stages.bytes_written += len(data)
        self.stages.lap("write", clock)

    def _stretches(self, placed: Sequence[Placed], at: list[int], size: int) -> list[Stretch]:
        shards, offsets = list(map(_SHARD, placed)), list(map(_OFFSET, placed))
        for known_size, known_shards, known_offsets, found in self._known:
            if known_size == size and known_offsets == offsets and known_shards == shards:
                return found
        found, i = [], 0  # members lie end to end where their offset less their place in the run is the same
        for (shard, origin), same in groupby(zip(shards, map(sub, offsets, at))):
            j = i + len(list(same))
            found.append((shard, origin + at[i], at[i], at[j]))
            i = j
        self._known.append((size, shards, offsets, found))
        return found
