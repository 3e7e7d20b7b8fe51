"""UnitRunner: the one worker function. Read each input range once, combine for every output, hash, pwrite (or,
for an s3:// output, copy into the unit's part buffer, uploaded as one part of the shard's multipart upload)."""

from __future__ import annotations

import os
import socket
import threading
import time

import torch
import xxhash

from .. import gcpause
from ..dtypes import ITEMSIZE, is_float
from ..io import s3, s3_sink
from ..io.direct import DirectReader
from ..io.ranges import FileHandles, read_into, write_at
from ..io.sources import local_copy
from ..kernels.cpu import nonfinite
from ..kernels.sparse import Sparse
from ..kernels.stats import Stats
from ..planning.experts import read_ranges
from ..planning.fp8 import SCALE_RULE, in_one_piece
from ..planning.layout import Piece, Placed, Unit
from ..planning.parts import Part, copied_as_stored
from ..planning.plan import input_needs, span
from ..planning.planner import PlannedTensor, Src
from ..term import Term
from ..torch_dtypes import TORCH_DTYPES, compute_dtype
from . import rows, small_runs
from .device import make_compute, pick_device
from .direct_inputs import planned_ends
from .fp8_work import combine_blocked
from .histogram import select_unit
from .messages import PartResult, SegmentResult, Stages, UnitResult, WorkContext
from .source_digests import PieceSources, source_block_elems

WHOLE_PIECE = 1 << 62  # as a strip size: the piece in one strip


DIRECT_READS_ENV = "CHATVEC_DIRECT_READS"  # "1": uncached input ranges read with O_DIRECT (io/direct.py)


class UnitRunner:
    """Owns one worker's file handles and reused buffers; `run` executes a unit."""

    def __init__(
        self, ctx: WorkContext, node: str | None = None, device: str = "auto", strict: bool | None = None
    ) -> None:
        """`device`: auto, cpu, cuda or cuda:N; `strict`: fail rather than compute on the CPU where the GPU kernel
        cannot run (default: unless `auto`)."""
        self.ctx = ctx
        self.files = FileHandles()
        self.compute = make_compute(pick_device(device), device != "auto" if strict is None else strict)
        self.device = self.compute.device
        direct = os.environ.get(DIRECT_READS_ENV) == "1" and not self.compute.pinned  # a GPU: pinned buffers
        self.direct = DirectReader(self.files) if direct else None
        self._ends: dict[Src, int] = {}  # per source read as one local range in this piece: where the range ends
        self._bufs: dict[object, torch.Tensor] = {}
        self._local_paths: dict[str, str] = {}  # a Hub input, on a node without the driver's cache
        self._part_bufs: dict[int, bytearray] = {}  # per s3:// output: the current unit's parts, reused
        self._staged: dict[int, list[tuple[Part, memoryview]]] = {}  # per s3:// output: each part and its bytes
        self._scales: dict[tuple[int, str], torch.Tensor] = {}  # (output, scale tensor) → its weight's new scales
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"
        self.node = node or socket.gethostname()

    def _buffer(self, key: object, nbytes: int) -> torch.Tensor:
        """A reused host buffer (pinned when a GPU will copy from or into it)."""
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.compute.pinned)
        return buf[:nbytes]

    def run(self, unit: Unit) -> UnitResult:
        if self.ctx.select is not None:  # TIES' pre-pass: histograms, nothing written
            return select_unit(self, unit)
        t0 = time.perf_counter()
        stages = Stages()
        self._stage_parts(unit)
        results = []
        with gcpause.kept():  # a result per tensor and output: many small objects, none in a cycle
            for work in small_runs.runs(unit.pieces, self.ctx) if self.compute.runs_of_small else unit.pieces:
                if isinstance(work, Piece):
                    results += self._piece(work, stages)
                else:
                    results += small_runs.do_run(self, work, stages)
        parts = self._upload_parts(stages)
        return UnitResult(unit.id, results, self.worker, self.node, time.perf_counter() - t0, stages, parts)

    def _stage_parts(self, unit: Unit) -> None:
        """Give each of the unit's parts (s3:// outputs) its place in the output's reused buffer (a part the store
        copies: none); the first part of a shard gets the shard's header."""
        self._staged = {}
        for o, out in enumerate(self.ctx.outputs):
            if out.parts is None or out.headers is None:
                continue
            parts = out.parts.get(unit.id, [])
            need = sum(p.size for p in parts if p.copy is None)
            if len(self._part_bufs.setdefault(o, bytearray())) < need:
                self._part_bufs[o] = bytearray(need)
            view, at, staged = memoryview(self._part_bufs[o]), 0, []
            for part in parts:
                size = part.size if part.copy is None else 0
                staged.append((part, view[at : at + size]))
                at += size
                if part.start == 0:
                    header = out.headers[part.shard]
                    staged[-1][1][: len(header)] = header
            self._staged[o] = staged

    def _upload_parts(self, stages: Stages) -> list[PartResult]:
        """Upload the unit's parts of every s3:// output (an upload of the same number again replaces it); a copy
        is made by the store from CP's object, pinned to the ETag its bytes were read (and hashed) at."""
        clock, done = time.perf_counter(), []
        for o, staged in self._staged.items():
            out = self.ctx.outputs[o]
            assert out.uploads is not None
            for part, data in staged:
                url, upload = out.shard_paths[part.shard], out.uploads[part.shard]
                if part.copy is None:
                    etag = s3_sink.upload_part(url, upload, part.number, data)
                else:
                    source, offset = part.copy
                    etag = s3_sink.upload_part_copy(
                        url, upload, part.number, source, offset, part.size, self.ctx.etags[source]
                    )
                done.append(PartResult(o, part.shard, part.number, etag, part.size))
        stages.lap("write", clock)
        return done

    def _piece(self, piece: Piece, stages: Stages) -> list[SegmentResult]:
        """A piece, strip by strip: each strip is read, combined, hashed and written while it is in cache."""
        columns = [(o, out.tensors[piece.index]) for o, out in enumerate(self.ctx.outputs)]
        itemsize = min(ITEMSIZE[p.tensor.out_dtype] for _, p in columns)
        block = self.ctx.block_bytes
        strip_bytes = self.compute.strip_bytes
        objects = any(s3.is_url(src.path) for _, p in columns for src in p.tensor.srcs)
        if objects or any(in_one_piece(p.tensor) for _, p in columns):
            # an object: one ranged read per piece and source (in parallel parts); FP8 blocks: whole 128-row block
            # rows, and the scales beside them
            strip_bytes = WHOLE_PIECE
        step = block * max(1, strip_bytes // block) // itemsize  # whole hash blocks of every output
        sources = PieceSources(piece, [p.tensor for _, p in columns], source_block_elems(block))
        self.plan_reads(piece, [p.tensor for _, p in columns])
        segments: dict[int, SegmentResult] = {}
        for first in range(piece.first, max(piece.last, piece.first + 1), step):
            strip = Piece(piece.index, first, min(first + step, piece.last))
            for seg in self._strip(strip, columns, stages, sources):
                done = segments.get(seg.output)
                if done is not None:
                    done.stats.add(seg.stats)
                    seg = SegmentResult(seg.output, seg.index, done.blocks + seg.blocks, done.stats)
                segments[seg.output] = seg
        return [s._replace(sources=sources.digests(columns[s.output][1].tensor)) for s in segments.values()]

    def _strip(
        self, piece: Piece, columns: list[tuple[int, Placed]], stages: Stages, sources: PieceSources
    ) -> list[SegmentResult]:
        clock = time.perf_counter()
        inputs = self._read_inputs(piece, [p.tensor for _, p in columns])
        stages.bytes_read += sum(t.numel() * t.element_size() for t in inputs.values())
        clock = stages.lap("read", clock)
        sources.feed(piece, {s: t.view(torch.uint8).numpy().data for s, t in inputs.items()})  # while in cache
        clock = stages.lap("hash", clock)
        computed = [p.tensor for _, p in columns if not copied_as_stored(p.tensor)]
        needs = input_needs(piece, computed)  # what the kernel reads: not the straight copies' bytes
        staged = self.compute.upload({s: inputs[s][:n] for s, n in needs.items()})
        results = []
        for o, placed in columns:
            t = placed.tensor
            count, merged = span(t, piece)
            if count == 0 and t.numel:
                continue  # this output's tensor (a smaller vocabulary) ends before the piece
            itemsize = ITEMSIZE[t.out_dtype]
            if copied_as_stored(t):
                assert t.cp is not None
                out = inputs[t.cp][:count].view(torch.uint8)
                stats = nonfinite(inputs[t.cp][:count]) if is_float(t.out_dtype) else Stats()
            elif t.rule == SCALE_RULE:  # computed with its weight, the piece before it in this unit
                out, stats = self._scales.pop((o, t.name)).view(torch.uint8), Stats()
            elif in_one_piece(t):
                out = self._buffer("out", count * itemsize)
                stats, scales = combine_blocked(self.compute, t, staged, out.view(TORCH_DTYPES[t.out_dtype]))
                if scales is not None:
                    self._scales[(o, scales[0])] = scales[1]
            else:
                out = self._buffer("out", count * itemsize)
                cp = staged[t.cp][:count] if t.cp is not None else None
                view = out.view(TORCH_DTYPES[t.out_dtype])
                if t.rows:
                    stats = self._with_rows(t, piece.first, merged, staged, view, inputs, sources)
                else:
                    stats = self._combine(t, piece.first, merged, cp, staged, view)
            clock = stages.lap("compute", clock)
            digests = self._hash_and_write(o, placed, out, piece.first * itemsize, stages, clock)
            clock = time.perf_counter()
            results.append(SegmentResult(o, piece.index, digests, stats))
        return results

    def plan_reads(self, piece: Piece, tensors: list[PlannedTensor]) -> None:
        """Before a piece's strips: how far past each strip the direct reader may read (the piece's own range)."""
        self._ends = planned_ends(piece, tensors) if self.direct else {}

    def _read_inputs(self, piece: Piece, tensors: list[PlannedTensor]) -> dict[Src, torch.Tensor]:
        """Read every source range the outputs need, each once (outputs share vectors and often CPs)."""
        inputs = {}
        for slot, (src, count) in enumerate(input_needs(piece, tensors).items()):
            if src in self._ends and count:
                inputs[src] = self._read_direct(("in", slot), src, piece.first, count, tensors[0].name)
                continue
            size = ITEMSIZE[src.dtype]
            buf = self._buffer(("in", slot), count * size)
            at = 0
            for path, offset, nbytes in read_ranges(src, piece.first, count):  # one, or fused experts' segments
                self._read(path, offset, buf.numpy().data[at : at + nbytes], tensors[0].name)
                at += nbytes
            inputs[src] = buf.view(TORCH_DTYPES[src.dtype])
        return inputs

    def _read_direct(self, slot: object, src: Src, first: int, count: int, tensor: str) -> torch.Tensor:
        """Elements [first, first + count) of a source in one local range: a view of the direct reader's window."""
        ((source, offset, nbytes),) = read_ranges(src, first, count)
        assert self.direct is not None
        view = self.direct.read(slot, self._path(source), offset, nbytes, self._ends[src], tensor)
        return torch.frombuffer(view, dtype=torch.uint8).view(TORCH_DTYPES[src.dtype])

    def _path(self, source: str) -> str:
        """Where an input is read: a Hub file through this node's copy, else the file or object itself."""
        return self._local_paths.get(source) or self._local_paths.setdefault(
            source, local_copy(source, self.ctx.hub_files)
        )

    def _read(self, source: str, offset: int, buf: memoryview, tensor: str) -> None:
        """Fill `buf` from byte `offset` of an input file (a Hub file through this node's copy) or object."""
        path = self._path(source)
        if s3.is_url(path):  # ranged GETs, each process with its own client and credentials
            s3.read_into(path, offset, buf, tensor, self.ctx.etags.get(path))
        else:
            read_into(self.files.get(path), buf, offset, path, tensor)

    def _with_rows(
        self,
        t: PlannedTensor,
        first: int,
        merged: int,
        staged: dict[Src, torch.Tensor],
        out: torch.Tensor,
        inputs: dict[Src, torch.Tensor],
        sources: PieceSources,
    ) -> Stats:
        """A strip of a tensor with chat-template token rows (exec/rows.py): the rest combined as usual; a chat row
        read from its first element is read whole and hashed (its source digest)."""
        assert t.cp is not None and t.row_src is not None
        cp, row_src = staged[t.cp], t.row_src

        def combine(a: int, b: int) -> Stats:
            rest = {s: v[a:] for s, v in staged.items()}
            return self._combine(t, first + a, max(0, min(merged, b) - a), cp[a:b], rest, out[a:b])

        def read_chat(at: int, n: int) -> torch.Tensor:
            whole = sources.row_read(t, at, n)
            buf = self._buffer("row", whole * ITEMSIZE[row_src.dtype])
            done = 0
            for path, offset, nbytes in read_ranges(row_src, at, whole):
                self._read(path, offset, buf.numpy().data[done : done + nbytes], t.name)
                done += nbytes
            sources.feed_row(t, at, buf.numpy().data)
            return buf.view(TORCH_DTYPES[row_src.dtype])[:n]

        return rows.combine_with_rows(t, first, out, inputs[t.cp], combine, read_chat)

    def _combine(
        self,
        t: PlannedTensor,
        first: int,
        merged: int,
        cp: torch.Tensor | None,
        inputs: dict[Src, torch.Tensor],
        out: torch.Tensor,
    ) -> Stats:
        """The kernel on the piece's elements [first, first + out.numel()) of tensor `t`."""
        terms = [
            Term(alpha, inputs[plus][:merged], inputs[minus][:merged] if minus is not None else None)
            for alpha, plus, minus in (t.terms if merged else ())
        ]
        dtypes = [t.out_dtype] + [s.dtype for s in t.srcs]
        compute = compute_dtype(dtypes)
        sparse = Sparse(first, t.dare, t.ties) if terms and (t.dare or t.ties) else None
        stats = self.compute.combine(out[:merged], cp[:merged] if cp is not None else None, terms, compute, sparse)
        if merged < out.numel():  # rows past the base vocabulary keep CP's values
            assert cp is not None
            stats.add(self.compute.combine(out[merged:], cp[merged:], [], compute))
        return stats

    def _hash_and_write(
        self, o: int, placed: Placed, out: torch.Tensor, start: int, stages: Stages, clock: float
    ) -> tuple[tuple[int, bytes], ...]:
        """xxh3-128 of each hash block of the tensor that this output range covers (it starts on a block), each
        block written right after it is hashed, while it is still in cache: one pass over the output's bytes."""
        block, data = self.ctx.block_bytes, out.numpy().data
        path = self.ctx.outputs[o].shard_paths[placed.shard]
        fd = self.files.get(path, os.O_WRONLY) if o not in self._staged else -1
        digests = []
        for k, i in enumerate(range(0, max(len(data), 1), block)):
            digests.append((start // block + k, xxhash.xxh3_128_digest(data[i : i + block])))
            clock = stages.lap("hash", clock)
            at = placed.offset + start + i
            if fd < 0:
                self._copy_to_part(o, placed.shard, at, data[i : i + block])
            else:
                write_at(fd, data[i : i + block], at, path)
            clock = stages.lap("write", clock)
        stages.bytes_written += len(data)
        return tuple(digests)

    def _copy_to_part(self, o: int, shard: int, at: int, data: memoryview) -> None:
        """Bytes for shard offset `at` of an s3:// output, into the part of the unit that holds that offset."""
        if not len(data):
            return
        for part, view in self._staged[o]:
            if part.shard == shard and part.start <= at and at + len(data) <= part.end:
                if part.copy is None:  # else the store copies these very bytes from CP's object
                    view[at - part.start : at - part.start + len(data)] = data
                return
        raise AssertionError(f"bytes [{at}, {at + len(data)}) of shard {shard} are in no part of the unit")

    def close(self) -> None:
        """Make every write durable, then release the files."""
        try:
            self.files.sync()
        finally:
            self.files.close()
