"""Multipart layout for an object-store output: each unit's bytes in a shard are one part of that shard's upload.

An object store takes a shard as a multipart upload: parts in any order, from any client, assembled by number;
1 to 10,000 parts, each at least 5 MiB except the last. Units follow the tensor order and (for such outputs) never
span two shards, so a unit's bytes in a shard are one contiguous range: its part. The first part of a shard starts
at byte 0 and carries the header.

A part whose bytes are all CP tensors copied as stored (`--exclude`, `--vocab skip`, non-float), adjacent in one
s3:// object of CP in the same order, is a copy: the store makes it from that object's byte range (UploadPartCopy),
pinned to the ETag the plan read, and no byte of it goes up from a worker. The worker still reads the range, for
the manifest's block digests and NaN/Inf counts (never a digest of bytes nobody saw).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from ..dtypes import ITEMSIZE
from ..errors import PlanError
from ..io import s3
from .layout import MIN_PART, Layout, Placed, Unit
from .plan import span
from .planner import PlannedTensor

MAX_PARTS = 10_000  # per upload
COPY_ENV = "CHATVEC_S3_PART_COPY"  # 0: upload every part (a store without UploadPartCopy); 1 (default): copy


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of shard `shard`, written by unit `unit` as part `number` (from 1) of its upload."""

    unit: int
    shard: int
    number: int
    start: int
    end: int
    copy: tuple[str, int] | None = None  # (CP object's URL, offset): a server-side copy of its bytes from there

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_parts(layout: Layout, units: list[Unit]) -> dict[int, list[Part]]:
    """Each unit's parts (by unit id) in one output, copies marked (unless $CHATVEC_S3_PART_COPY is 0); refuses
    a layout an object store cannot take."""
    copies = _copies_wanted()
    ranges: dict[tuple[int, int], list[int]] = {}  # (unit, shard) -> [start, end]
    for unit in units:
        for piece in unit.pieces:
            placed = layout.tensors[piece.index]
            count = span(placed.tensor, piece)[0]
            itemsize = ITEMSIZE[placed.tensor.out_dtype]
            start = placed.offset + piece.first * itemsize
            if count == 0:  # this output's tensor ends before the piece (a smaller vocabulary), or is empty:
                if placed.tensor.numel == 0:  # its shard's part still carries the header
                    ranges.setdefault((unit.id, placed.shard), [start, start])
                continue
            found = ranges.setdefault((unit.id, placed.shard), [start, start])
            if found[1] != start:
                raise PlanError(
                    f"internal: unit {unit.id} writes two separate ranges of this shard",
                    file=layout.shards[placed.shard].name,
                )
            found[1] = start + count * itemsize
    by_unit: dict[int, list[Part]] = {}
    shards = _by_shard(ranges)
    if len(shards) != len(layout.shards):
        raise PlanError("internal: a shard that no unit writes (only empty tensors?)")
    in_order = _by_offset(layout) if copies else {}
    for shard, rows in shards.items():
        name = layout.shards[shard].name
        rows[0][1] = 0  # the first part starts at the header
        _check_tiles(rows, layout.shards[shard].size, name)
        for number, (uid, start, end) in enumerate(rows, 1):
            copy = _copy_source(in_order[shard], start, end) if copies else None
            by_unit.setdefault(uid, []).append(Part(uid, shard, number, start, end, copy))
    return by_unit


def copied_as_stored(t: PlannedTensor) -> bool:
    """A copy of CP's tensor in CP's own dtype, no token row taken from chat: its output bytes are CP's (the worker
    writes them as read; an s3:// output's part of them may be copied by the store)."""
    return t.rule == "copy" and t.cp is not None and t.cp.dtype == t.out_dtype and not t.rows


def _copies_wanted() -> bool:
    value = os.environ.get(COPY_ENV, "1")
    if value not in ("0", "1"):
        raise PlanError(f"${COPY_ENV} is {value!r}: 1 copies parts server-side where it can (default), 0 never")
    return value == "1"


def _by_offset(layout: Layout) -> dict[int, tuple[list[int], list[Placed]]]:
    """Each shard's non-empty tensors in byte order, and their offsets."""
    shards: dict[int, list[Placed]] = {k: [] for k in range(len(layout.shards))}
    for p in layout.tensors:
        if p.nbytes:
            shards[p.shard].append(p)
    ordered = {k: sorted(ps, key=lambda p: p.offset) for k, ps in shards.items()}
    return {k: ([p.offset for p in ps], ps) for k, ps in ordered.items()}


def _copy_source(shard: tuple[list[int], list[Placed]], start: int, end: int) -> tuple[str, int] | None:
    """(URL, offset) where bytes [start, end) of a shard (its tensors' offsets, and the tensors) are one range of
    one s3:// object: where every tensor they hold is copied from it as stored, adjacent there in the same order,
    and they hold no header byte; else None."""
    offsets, placed = shard
    first = bisect.bisect_right(offsets, start) - 1  # the tensor holding byte `start`
    if first < 0 or start >= end:  # in the header
        return None
    found = None
    for p in placed[first:]:
        if p.offset >= end:
            break
        t = p.tensor
        if not copied_as_stored(t) or t.cp is None or not s3.is_url(t.cp.path):
            return None
        here = (t.cp.path, t.cp.start - p.offset)  # an output byte's place in the object: offset + shift
        if found not in (None, here):
            return None
        found = here
    return None if found is None else (found[0], found[1] + start)


def _by_shard(ranges: dict[tuple[int, int], list[int]]) -> dict[int, list[list[int]]]:
    """Per shard, [unit, start, end] rows in byte order."""
    shards: dict[int, list[list[int]]] = {}
    for (unit, shard), (start, end) in ranges.items():
        shards.setdefault(shard, []).append([unit, start, end])
    return {s: sorted(rows, key=lambda r: r[1]) for s, rows in shards.items()}


def _check_tiles(rows: list[list[int]], size: int, name: str) -> None:
    """The parts cover the shard exactly, each but the last is large enough, and there are not too many."""
    if len(rows) > MAX_PARTS:
        raise PlanError(
            f"{len(rows)} parts: an object store takes at most {MAX_PARTS} per upload (use a larger --unit-size)",
            file=name,
        )
    at = 0
    for k, (_, start, end) in enumerate(rows):
        if start != at:
            raise PlanError(f"internal: parts leave bytes [{at}, {start}) unwritten", file=name)
        if k < len(rows) - 1 and end - start < MIN_PART:
            raise PlanError(
                f"part {k + 1} would be {end - start} bytes: an object store needs at least 5 MiB in every part "
                "but a shard's last (use --unit-size 8MiB or more)",
                file=name,
            )
        at = end
    if at != size:
        raise PlanError(f"internal: parts end at byte {at} of {size}", file=name)
