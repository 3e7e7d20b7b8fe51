"""Multipart layout for an object-store output: each unit's bytes in a shard are one part of that shard's upload.

An object store takes a shard as a multipart upload: parts in any order, from any client, assembled by number;
1 to 10,000 parts, each at least 5 MiB except the last. Units follow the tensor order and (for such outputs) never
span two shards, so a unit's bytes in a shard are one contiguous range: its part. The first part of a shard starts
at byte 0 and carries the header.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import ITEMSIZE
from ..errors import PlanError
from .layout import MIN_PART, Layout, Unit
from .plan import span

MAX_PARTS = 10_000  # per upload


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of shard `shard`, written by unit `unit` as part `number` (from 1) of its upload."""

    unit: int
    shard: int
    number: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_parts(layout: Layout, units: list[Unit]) -> dict[int, list[Part]]:
    """Each unit's parts (by unit id) in one output; refuses a layout an object store cannot take."""
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
    for shard, rows in shards.items():
        name = layout.shards[shard].name
        rows[0][1] = 0  # the first part starts at the header
        _check_tiles(rows, layout.shards[shard].size, name)
        for number, (uid, start, end) in enumerate(rows, 1):
            by_unit.setdefault(uid, []).append(Part(uid, shard, number, start, end))
    return by_unit


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
