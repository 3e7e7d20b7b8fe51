"""Where every output byte goes: shards, offsets and work units, fixed before any work starts."""
from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import ITEMSIZE
from ..errors import PlanError
from ..io.header import OutEntry, encode_header
from .planner import PlannedTensor

SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Placed:
    """A planned tensor with its shard and absolute byte offset in that shard file."""

    tensor: PlannedTensor
    shard: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Shard:
    name: str
    header: bytes
    size: int


@dataclass(frozen=True)
class Segment:
    """Elements [first, last) of tensor `index`: exactly one hash block of that tensor."""

    index: int
    first: int
    last: int
    block: int


@dataclass(frozen=True)
class Unit:
    """A contiguous byte range of one shard and the tensor pieces that fill it."""

    id: int
    shard: int
    offset: int
    nbytes: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Layout:
    tensors: list[Placed]
    shards: list[Shard]
    units: list[Unit]
    unit_bytes: int


def layout(tensors: list[PlannedTensor], max_shard_size: int, unit_bytes: int) -> Layout:
    """Pack tensors into shards of at most `max_shard_size` bytes and cut the work into units."""
    if unit_bytes < 8 or unit_bytes % 8:
        raise PlanError(f"unit size {unit_bytes} must be a positive multiple of 8 bytes")
    if max_shard_size <= 0:
        raise PlanError(f"max shard size {max_shard_size} must be positive")
    groups: list[list[PlannedTensor]] = [[]]
    filled = 0
    for t in tensors:
        size = t.numel * ITEMSIZE[t.out_dtype]
        if groups[-1] and filled + size > max_shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(t)
        filled += size
    placed: list[Placed] = []
    shards: list[Shard] = []
    for i, group in enumerate(groups):
        # Largest itemsize first keeps every tensor aligned to its itemsize (the header is 8-aligned).
        group = sorted(group, key=lambda t: -ITEMSIZE[t.out_dtype])
        entries, begin = [], 0
        for t in group:
            end = begin + t.numel * ITEMSIZE[t.out_dtype]
            entries.append(OutEntry(t.name, t.out_dtype, t.shape, begin, end))
            begin = end
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header = encode_header(entries, SHARD_METADATA)
        shards.append(Shard(name, header, len(header) + begin))
        placed += [Placed(t, i, len(header) + e.begin, e.end - e.begin) for t, e in zip(group, entries)]
    return Layout(placed, shards, _units(placed, unit_bytes), unit_bytes)


def _units(placed: list[Placed], unit_bytes: int) -> list[Unit]:
    units: list[Unit] = []
    segments: list[Segment] = []
    start = filled = 0

    def flush() -> None:
        nonlocal segments, filled
        if segments:
            shard = placed[segments[0].index].shard
            units.append(Unit(len(units), shard, start, filled, tuple(segments)))
        segments, filled = [], 0

    for index, p in enumerate(placed):
        if segments and placed[segments[0].index].shard != p.shard:
            flush()
        itemsize = ITEMSIZE[p.tensor.out_dtype]
        numel = p.tensor.numel
        if p.nbytes <= unit_bytes:
            if filled + p.nbytes > unit_bytes:
                flush()
            if not segments:
                start = p.offset
            segments.append(Segment(index, 0, numel, 0))
            filled += p.nbytes
            continue
        flush()
        per = unit_bytes // itemsize
        for block, first in enumerate(range(0, numel, per)):
            last = min(numel, first + per)
            start = p.offset + first * itemsize
            segments.append(Segment(index, first, last, block))
            filled = (last - first) * itemsize
            if last - first == per:
                flush()
    flush()
    return units
