"""The journal: one output's finished units, appended as results arrive and read back to resume."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..errors import OutputError
from ..exec.messages import PartResult, SegmentResult, UnitResult
from ..kernels.stats import Stats

DIGEST = 16  # bytes of an xxh3-128 digest


class Journal:
    """One output's finished units, one JSON line each, appended as results arrive; read back to resume. A line
    of an s3:// output also lists the unit's uploaded parts: [shard, part number, ETag, size]."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "a+b")  # noqa: SIM115 (appended to until close)
            self._file.seek(0)
            data = self._file.read()
            self._file.truncate(data.rfind(b"\n") + 1)  # drop a last line a crash cut short
        except OSError as e:
            raise OutputError(f"cannot open the journal: {e.strerror}", file=str(path)) from None

    def append(self, r: UnitResult) -> None:
        segs = [_segment_record(s) for s in r.segments]
        record = {"unit": r.unit, "segments": segs, "worker": r.worker, "node": r.node, "seconds": r.seconds}
        if r.parts:  # an s3:// output: the parts uploaded, to check (ListParts) and complete on resume
            record["parts"] = [[p.shard, p.number, p.etag, p.size] for p in r.parts]
        line = json.dumps(record)
        try:
            self._file.write(line.encode() + b"\n")
            self._file.flush()
        except OSError as e:
            raise OutputError(f"cannot append to the journal: {e.strerror}", file=str(self.path)) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # what could not be flushed is a unit to redo, never a wrong one
            self._file.close()

    @staticmethod
    def load(path: Path, output: int) -> dict[int, UnitResult]:
        results: dict[int, UnitResult] = {}
        if not path.is_file():
            return results
        try:
            lines = path.read_bytes().splitlines()
        except OSError as e:
            raise OutputError(f"cannot read the journal: {e.strerror}", file=str(path)) from None
        for line in lines:
            try:
                d = json.loads(line.decode("utf-8"))
                segs = [_segment(record, output) for record in d["segments"]]
                parts = [
                    PartResult(output, shard, number, etag, size) for shard, number, etag, size in d.get("parts", ())
                ]
                results[d["unit"]] = UnitResult(d["unit"], segs, d["worker"], d["node"], d["seconds"], parts=parts)
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                continue  # a line cut short or garbled by a crash: that unit is simply redone
        return results


# A journaled segment, one short JSON list: [tensor index, [[block, digest hex], …], cp², Δ², (out − cp)², NaN, Inf,
# sources], then, under DARE or TIES, [kept per vector], agreeing, signed; sources: per source of the tensor [first
# source block, its consecutive blocks' digests in hex, joined]. A line of an earlier format (no sources) fails to
# unpack: its unit is redone.
def _segment_record(s: SegmentResult) -> list:
    stats = s.stats
    blocks = [[b, d.hex()] for b, d in s.blocks]
    sources = [[src[0][0], src[0][1].hex()] if len(src) == 1 else _joined(src) for src in s.sources]
    record = [s.index, blocks, stats.cp_sq, stats.delta_sq, stats.update_sq, stats.nan, stats.inf, sources]
    return record + [stats.kept, stats.agree, stats.signed] if stats.kept else record


def _joined(src: tuple[tuple[int, bytes], ...]) -> list:
    return [src[0][0] if src else 0, b"".join(d for _, d in src).hex()]


def _segment(record: list, output: int) -> SegmentResult:
    index, blocks, cp_sq, delta_sq, update_sq, nan, inf, sources, *sparse = record
    digests = tuple((b, bytes.fromhex(h)) for b, h in blocks)
    kept, agree, signed = sparse or ([], 0, 0)
    return SegmentResult(
        output,
        index,
        digests,
        Stats(cp_sq, delta_sq, update_sq, nan, inf, list(kept), agree, signed),
        tuple(_blocks(*s) for s in sources),
    )


def _blocks(first: int, joined: str) -> tuple[tuple[int, bytes], ...]:
    """Consecutive blocks' digests from their joined hex (DIGEST bytes each)."""
    data = bytes.fromhex(joined)
    if len(data) % DIGEST:
        raise ValueError("a digest cut short")
    return tuple((first + k, data[at : at + DIGEST]) for k, at in enumerate(range(0, len(data), DIGEST)))
