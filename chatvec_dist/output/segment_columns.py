"""One output's segments of a unit's result as columns, gathered once (in C) for both the tally and the journal:
an 8-output batch brings 45 k segments per output and unit, which both used to walk one Python step each."""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import NamedTuple

from ..exec.messages import SegmentResult
from ..exec.source_digests import Blocks
from ..kernels.stats import STATS_FIELDS, Stats, stats_columns


class SegmentColumns(NamedTuple):
    """Each SegmentResult field but `output` (every segment's is the same output), and each Stats field's values
    (`STATS_FIELDS` order), an item per segment."""

    index: Sequence[int]  # type: ignore[assignment]  # the tensors (shadows tuple.index)
    blocks: Sequence[Blocks]
    stats: Sequence[Stats]
    sources: Sequence[tuple[Blocks, ...]]
    fields: list[list]

    def field(self, name: str) -> list:
        return self.fields[STATS_FIELDS.index(name)]


def gather(segments: Sequence[SegmentResult]) -> SegmentColumns:
    """`segments` (one output's) as columns: the named tuples transposed by `zip`, the stats read field by field."""
    if not segments:
        return SegmentColumns((), (), (), (), [[] for _ in STATS_FIELDS])
    _, index, blocks, stats, sources = zip(*segments, strict=True)
    return SegmentColumns(index, blocks, stats, sources, stats_columns(stats))


def split_outputs(segments: list[SegmentResult], count: int) -> list[list[SegmentResult]]:
    """Each of `count` outputs' segments, in order: slices where they come output by output for each tensor (as a
    run of small tensors reports them, or a piece done for every output), else one pass."""
    outputs = list(map(_OUTPUT, segments))
    if len(outputs) % count == 0 and outputs == list(range(count)) * (len(outputs) // count):
        return [segments[o::count] for o in range(count)]
    found: list[list[SegmentResult]] = [[] for _ in range(count)]
    for s in segments:
        found[s.output].append(s)
    return found


_OUTPUT = itemgetter(0)  # a SegmentResult's output
