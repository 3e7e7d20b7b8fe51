"""run_unit: the one worker function. Read exact ranges, combine, hash, pwrite at the planned offset."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import torch
import xxhash

from ..dtypes import ITEMSIZE, TORCH_DTYPES, compute_dtype
from ..io.ranges import FileHandles, read_into, write_at
from ..kernels.cpu import Scratch, Stats, combine
from ..plan.layout import Layout, Placed, Unit
from ..plan.planner import Src


@dataclass(frozen=True)
class WorkContext:
    """What every worker needs besides the unit: the placed tensors and where the shards are."""

    tensors: list[Placed]
    shard_paths: list[str]

    @classmethod
    def of(cls, layout: Layout, out_dir: str) -> "WorkContext":
        return cls(layout.tensors, [os.path.join(out_dir, s.name) for s in layout.shards])


@dataclass(frozen=True)
class SegmentResult:
    index: int
    block: int
    digest: bytes
    stats: Stats


@dataclass(frozen=True)
class UnitResult:
    unit: int
    segments: list[SegmentResult]
    worker: str
    node: str
    seconds: float


class UnitRunner:
    """Owns one worker's file handles and reused buffers; `run` executes a unit."""

    def __init__(self, ctx: WorkContext, node: str | None = None) -> None:
        self.ctx = ctx
        self.files = FileHandles()
        self.scratch = Scratch()
        self._bufs: dict[object, torch.Tensor] = {}
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.node = node or socket.gethostname()

    def _buffer(self, key: object, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes]

    def _read(self, key: object, src: Src, first: int, count: int, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        size = ITEMSIZE[src.dtype]
        buf = into if into is not None else self._buffer(key, count * size)
        read_into(self.files.get(src.path), memoryview(buf.numpy()), src.start + first * size, src.path, name)
        return buf.view(TORCH_DTYPES[src.dtype])

    def run(self, unit: Unit) -> UnitResult:
        t0 = time.perf_counter()
        out = self._buffer("out", unit.nbytes)
        results = []
        for seg in unit.segments:
            placed = self.ctx.tensors[seg.index]
            t = placed.tensor
            count = seg.last - seg.first
            start = placed.offset + seg.first * ITEMSIZE[t.out_dtype] - unit.offset
            dst = out[start : start + count * ITEMSIZE[t.out_dtype]]
            if t.cp is not None and t.cp.dtype == t.out_dtype and t.rule == "copy":
                self._read("cp", t.cp, seg.first, count, t.name, into=dst)
                stats = Stats()
            else:
                stats = self._combine(t, seg.first, count, dst.view(TORCH_DTYPES[t.out_dtype]))
            results.append(SegmentResult(seg.index, seg.block, xxhash.xxh3_128_digest(memoryview(dst.numpy())), stats))
        path = self.ctx.shard_paths[unit.shard]
        write_at(self.files.get(path, os.O_WRONLY), memoryview(out.numpy()), unit.offset, path)
        return UnitResult(unit.id, results, self.worker, self.node, time.perf_counter() - t0)

    def _combine(self, t, first: int, count: int, out: torch.Tensor) -> Stats:
        merged = max(0, min(count, t.merge_elems - first))
        cp = self._read("cp", t.cp, first, count, t.name) if t.cp is not None else None
        terms = [(alpha, self._read(("plus", i), plus, first, merged, t.name),
                  self._read(("minus", i), minus, first, merged, t.name) if minus is not None else None)
                 for i, (alpha, plus, minus) in enumerate(t.terms)] if merged else []
        dtypes = [t.out_dtype] + ([t.cp.dtype] if t.cp else []) + [s.dtype for _, p, m in t.terms for s in (p, m) if s]
        compute = compute_dtype(dtypes)
        stats = combine(out[:merged], cp[:merged] if cp is not None else None, terms, compute, self.scratch)
        if merged < count:  # rows past the base vocabulary keep CP's values
            stats.add(combine(out[merged:], cp[merged:], [], compute, self.scratch))
        return stats

    def close(self) -> None:
        self.files.close()
