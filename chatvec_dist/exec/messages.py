"""What the driver and the workers exchange: the work context, each unit's results, and which elements of a
piece each output needs. No torch here: the driver never imports it on the Ray backend."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ..kernels.stats import Stats
from ..planning.layout import Placed

if TYPE_CHECKING:
    from ..planning.kth import Histogram, SelectPass
    from ..planning.parts import Part


@dataclass(frozen=True)
class OutputContext:
    """One output as a worker sees it: its placed tensors and shard files (local paths), or, for an s3:// output,
    its shards' URLs, each shard's multipart upload id and header, and each unit's parts (by unit id)."""

    tensors: list[Placed] | dict[int, Placed]  # by tensor index: a unit's own (exec/unit_context.py) or all
    shard_paths: list[str] | dict[int, str]  # by shard number, as are uploads and headers
    uploads: list[str] | dict[int, str] | None = None
    headers: list[bytes] | dict[int, bytes] | None = None
    parts: dict[int, list[Part]] | None = None


@dataclass(frozen=True)
class WorkContext:
    """What every worker needs besides the unit: each output's placed tensors and shard files."""

    outputs: list[OutputContext]
    block_bytes: int
    hub_files: dict[str, tuple[str, str, str]]  # input path on the driver → Hub (repo, commit, file), if from the Hub
    etags: dict[str, str] = dataclasses.field(default_factory=dict)  # s3:// input → the ETag planned with
    select: SelectPass | None = None  # TIES' pre-pass: histogram these tensors' vectors instead of merging


class SegmentResult(NamedTuple):
    """What one output got for one piece: digests of the hash blocks it covers, and stats; and the digests of the
    source hash blocks it read of each of its tensor's sources (`PlannedTensor.srcs` order; see source_digests).
    A named tuple: one per tensor per output, made at a third of a frozen dataclass's cost."""

    output: int
    index: int  # type: ignore[assignment]  # the tensor's, in the layout (shadows tuple.index)
    blocks: tuple[tuple[int, bytes], ...]
    stats: Stats
    sources: tuple[tuple[tuple[int, bytes], ...], ...] = ()


@dataclass(frozen=True)
class PartResult:
    """A part a worker uploaded: part `number` of shard `shard`'s upload in output `output`, its ETag and size."""

    output: int
    shard: int
    number: int
    etag: str
    size: int


@dataclass
class Stages:
    """Seconds a worker spent in each stage of its units, and the bytes read and written."""

    read: float = 0.0
    compute: float = 0.0
    hash: float = 0.0
    write: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0

    def add(self, other: Stages) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def lap(self, stage: str, since: float) -> float:
        """Add the time since `since` to `stage`; return now (the next stage's start)."""
        now = time.perf_counter()
        setattr(self, stage, getattr(self, stage) + now - since)
        return now


@dataclass(frozen=True)
class UnitResult:
    unit: int
    segments: list[SegmentResult]
    worker: str
    node: str
    seconds: float
    stages: Stages = dataclasses.field(default_factory=Stages)  # not journaled: a resumed unit reports zeros
    parts: list[PartResult] = dataclasses.field(default_factory=list)  # its s3:// outputs' uploaded parts
    histograms: list[tuple[int, list[Histogram]]] = dataclasses.field(default_factory=list)  # TIES' pre-pass
