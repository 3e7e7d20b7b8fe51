"""The journal: one output's finished units, appended as results arrive and read back to resume.

A file of records, after a first line naming the format (MAGIC): each record is its payload's length and xxh3-64 (HEAD),
then the payload, the unit in MessagePack (ints, floats, strings, bytes and arrays only, digests kept as raw bytes;
unlike marshal or pickle, safe to decode whatever the bytes). The journal is the longest run of intact records from the
start: the first one cut short by a crash, or whose bytes fail their checksum, and all after it, are units to redo,
never read. A file of another format (the JSON lines of earlier versions) is read as empty: its units are redone, and it
is emptied when opened."""

from __future__ import annotations

import contextlib
import operator
import struct
from collections.abc import Iterator
from pathlib import Path

import msgpack
import xxhash

from .. import gcpause
from ..errors import OutputError
from ..exec.messages import PartResult, SegmentResult, UnitResult
from ..kernels.stats import STATS_FIELDS, Stats
from .segment_columns import SegmentColumns, gather

MAGIC = b"chatvec journal 3\n"
HEAD = struct.Struct("<QQ")  # a record's payload length and the xxh3-64 of its payload


class Journal:
    """One output's finished units, one record each, appended as results arrive; read back to resume. Each record
    is flushed to the OS before `append` returns, as the JSON lines before it were: a killed driver loses none. A
    record of an s3:// output also lists the unit's uploaded parts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "a+b")  # noqa: SIM115 (appended to until close)
            self._file.seek(0)
            end = _intact_end(self._file.read())
            self._file.truncate(end)  # drop what a crash cut short, or a journal of another format
        except OSError as e:
            raise OutputError(f"cannot open the journal: {e.strerror}", file=str(path)) from None
        self._empty = end == 0

    def append(self, r: UnitResult, columns: SegmentColumns | None = None) -> None:
        """Journal `r` (one output's result); `columns`: its segments gathered already (`segment_columns.gather`)."""
        payload = _pack(_record(r, columns))  # in pieces: megabytes, written and hashed without joining them
        checksum = xxhash.xxh3_64()
        for piece in payload:
            checksum.update(piece)
        head = HEAD.pack(sum(map(len, payload)), checksum.intdigest())
        if self._empty:  # the format goes with the first record: an empty journal says no unit finished
            head = MAGIC + head
        try:
            self._file.writelines([head, *payload])
            self._file.flush()
        except OSError as e:
            raise OutputError(f"cannot append to the journal: {e.strerror}", file=str(self.path)) from None
        self._empty = False

    def close(self) -> None:
        _Packed.last = _Packed.empty  # its objects are a unit's: not kept beyond the run
        with contextlib.suppress(OSError):  # what could not be flushed is a unit to redo, never a wrong one
            self._file.close()

    @staticmethod
    def load(path: Path, output: int) -> dict[int, UnitResult]:
        """The units journaled in `path` (none if it is missing), as output number `output`'s results."""
        results: dict[int, UnitResult] = {}
        if not path.is_file():
            return results
        try:
            data = path.read_bytes()
        except OSError as e:
            raise OutputError(f"cannot read the journal: {e.strerror}", file=str(path)) from None
        with gcpause.kept():  # a million small objects, none in a cycle
            for _, payload in _records(data):
                try:
                    unit = _unit(msgpack.unpackb(payload, use_list=False), output)
                except (ValueError, TypeError, msgpack.UnpackException):  # bytes this version cannot read: redone
                    continue
                results[unit.unit] = unit
        return results


def _records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Each intact record's end offset and payload, from the start up to the first one cut short or garbled."""
    if not data.startswith(MAGIC):
        return
    at, size = len(MAGIC), len(data)
    while at + HEAD.size <= size:
        length, checksum = HEAD.unpack_from(data, at)
        end = at + HEAD.size + length
        payload = data[at + HEAD.size : end]
        if end > size or xxhash.xxh3_64_intdigest(payload) != checksum:
            return
        yield end, payload
        at = end


def _intact_end(data: bytes) -> int:
    """Where the intact records end: 0 for an empty journal or one of another format."""
    return max((end for end, _ in _records(data)), default=0)


# A journaled unit: (unit, worker, node, seconds, SEGMENTS, parts): SEGMENTS, one list per field, each with an item
# per segment (columns: no object made per segment, nothing for the garbage collector to scan), are the tensor
# indexes, their ((block, digest), …), cp², Δ², (out − cp)², NaN, Inf, sources (as in SegmentResult), [kept per
# vector], agreeing and signed; a part is (shard, part number, ETag, size).
# (Tuples and lists pack alike: a column is whichever `gather` made.)
def _record(r: UnitResult, columns: SegmentColumns | None = None) -> tuple:
    c = gather(r.segments) if columns is None else columns
    cp, delta, update, nan, inf, kept, agree, signed = c.fields  # STATS_FIELDS order
    parts = [(p.shard, p.number, p.etag, p.size) for p in r.parts]
    return (
        r.unit,
        r.worker,
        r.node,
        r.seconds,
        c.index,
        c.blocks,
        cp,
        delta,
        update,
        nan,
        inf,
        c.sources,
        kept,
        agree,
        signed,
        parts,
    )


_SOURCES = 11  # the sources column's place in a record
assert STATS_FIELDS == ("cp_sq", "delta_sq", "update_sq", "nan", "inf", "kept", "agree", "signed")  # the format's


class _Packed:
    """The sources column last packed (its objects, held) with its bytes, as one pair (read and replaced whole):
    the outputs of a batch report the very same digests objects for the sources they share (exec/small_runs.py),
    so their records, one after the other, pack them once."""

    empty: tuple[list, bytes] = ([], msgpack.packb([]))
    last = empty


def _pack(record: tuple) -> list[bytes]:
    """`msgpack.packb(record)` in pieces, field by field (an array is its header, then its items), the sources
    column's bytes reused where it holds the very same objects as the last record's."""
    packer = msgpack.Packer(use_bin_type=True)
    column, (last, data) = record[_SOURCES], _Packed.last
    if len(column) != len(last) or not all(map(operator.is_, column, last)):
        data = packer.pack(column)
        _Packed.last = (column, data)
    parts = [packer.pack(f) if i != _SOURCES else data for i, f in enumerate(record)]
    return [packer.pack_array_header(len(record)), *parts]


def _unit(record: tuple, output: int) -> UnitResult:
    unit, worker, node, seconds, *columns, parts = record
    segments = [
        SegmentResult(output, i, b, Stats(cp, delta, update, nan, inf, list(kept), agree, signed), s)
        for i, b, cp, delta, update, nan, inf, s, kept, agree, signed in zip(*columns, strict=True)
    ]
    parts = [PartResult(output, shard, number, etag, size) for shard, number, etag, size in parts]
    return UnitResult(unit, segments, worker, node, seconds, parts=parts)
