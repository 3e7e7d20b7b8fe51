"""Where every output byte goes (shards, offsets) and how the work is cut, fixed before any work starts."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from ..dtypes import ITEMSIZE
from ..errors import PlanError
from ..io.header import OutEntry, encode_header
from ..pickling import by_fields
from ..quickinit import maker, quick_init
from .fp8 import SCALE_RULE, in_one_piece, with_scales_beside
from .planner import PlannedTensor

SHARD_METADATA = {"format": "pt"}
MIN_PART = 5 * 2**20  # an object store's smallest multipart part (all but a shard's last)
MAX_UNITS = 1_000_000  # work units per job: a 1 TB model still gets units of 1 MiB
HASH_BLOCK_BYTES = 1 << 20  # content hashes cover blocks of this many bytes (or of the unit size, if smaller)


@by_fields
@quick_init
@dataclass(frozen=True, slots=True)
class Placed:
    """A planned tensor with its shard and absolute byte offset in that shard file."""

    tensor: PlannedTensor
    shard: int
    offset: int
    nbytes: int


make_placed = maker(Placed)  # one per tensor of every output


@dataclass(frozen=True)
class Shard:
    name: str
    header: bytes
    size: int


@dataclass(frozen=True)
class Layout:
    """One output's shards and the place of each of its tensors."""

    tensors: list[Placed]
    shards: list[Shard]


@by_fields
@quick_init
@dataclass(frozen=True, slots=True)
class Piece:
    """Elements [first, last) of tensor `index` (the same tensor in every output)."""

    index: int
    first: int
    last: int


@by_fields
@quick_init
@dataclass(frozen=True, slots=True)
class Unit:
    """Work for one worker call: pieces of tensors, computed for every output at once."""

    id: int
    pieces: tuple[Piece, ...]
    nbytes: int


def layout(tensors: list[PlannedTensor], max_shard_size: int, at_shards: bool = False) -> Layout:
    """Pack tensors into shards of at most `max_shard_size` bytes and fix every offset. `at_shards` (an object
    store's layout, tensors given in `byte_rank` order): each combined FP8 weight and its scales stay adjacent, in
    one shard."""
    check_max_shard_size(max_shard_size)
    sizes = [math.prod(t.shape) * ITEMSIZE[t.out_dtype] for t in tensors]
    placed: list[Placed] = [None] * len(tensors)  # type: ignore[list-item] # every one is set below
    shards: list[Shard] = []
    groups = _groups(tensors, sizes, max_shard_size, at_shards)
    ranks = [-byte_rank(t, at_shards) for t in tensors]
    for k, group in enumerate(groups):
        # Largest itemsize first keeps every tensor aligned to its itemsize (the header is 8-aligned).
        group = sorted(group, key=ranks.__getitem__)
        entries, begin = [], 0
        for i in group:
            t = tensors[i]
            entries.append(OutEntry(t.name, t.out_dtype, t.shape, begin, begin + sizes[i]))
            begin += sizes[i]
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header = encode_header(entries, SHARD_METADATA)
        shards.append(Shard(name, header, len(header) + begin))
        for i, e in zip(group, entries):
            placed[i] = make_placed(tensors[i], k, len(header) + e.begin, e.end - e.begin)
    return Layout(placed, shards)


def byte_rank(t: PlannedTensor, at_shards: bool) -> int:
    """A tensor's place in its shard, highest first: its itemsize, so larger itemsizes go first. For an object
    store, a combined FP8 weight and its float32 scales rank 3 together, right after the float32 tensors: one unit
    writes both as one part (check_store_pairs keeps the scales aligned)."""
    return 3 if at_shards and with_scales_beside(t) else ITEMSIZE[t.out_dtype]


def _groups(tensors: list[PlannedTensor], sizes: list[int], max_shard_size: int, at_shards: bool) -> list[list[int]]:
    """The tensors (indices) of each shard, in order; a shard is closed before a tensor that would overflow it,
    but (for an object store) never between a weight and its scales: the weight's place is decided for both."""
    groups: list[list[int]] = [[]]
    filled = 0
    for k, t in enumerate(tensors):
        beside = at_shards and k + 1 < len(tensors) and tensors[k + 1].rule == SCALE_RULE
        need = sizes[k] + (sizes[k + 1] if beside else 0)
        joins = at_shards and t.rule == SCALE_RULE  # its weight, just before it, took this shard for both
        if groups[-1] and filled + need > max_shard_size and not joins:
            groups.append([])
            filled = 0
        groups[-1].append(k)
        filled += sizes[k]
    return groups


def block_bytes(unit_bytes: int) -> int:
    return min(unit_bytes, HASH_BLOCK_BYTES)


def check_max_shard_size(max_shard_size: int) -> None:
    if max_shard_size <= 0:
        raise PlanError(f"max shard size {max_shard_size} must be positive")


def check_unit_bytes(unit_bytes: int) -> None:
    if unit_bytes < 8 or unit_bytes % 8 or unit_bytes % block_bytes(unit_bytes):
        raise PlanError(
            f"unit size {unit_bytes} bytes: must be a multiple of 8 bytes up to 1 MiB, "
            f"and a whole number of MiB above (e.g. 256KiB, 64MiB)"
        )


def cut_units(layouts: list[Layout], unit_bytes: int, at_shards: bool = False) -> list[Unit]:
    """Cut the tensors shared by all outputs into units of about `unit_bytes` of output each.

    Small tensors are grouped; large ones are split at hash-block boundaries of every output, so a block's
    digest never depends on how the work was cut or who did it. With `at_shards` (outputs in an object store,
    one multipart upload per shard), no unit spans two shards of any output.
    """
    check_unit_bytes(unit_bytes)
    layouts = list({id(lay): lay for lay in layouts}.values())  # a layout shared by several outputs cuts alike
    total = max(sum(map(_NBYTES, lay.tensors)) for lay in layouts)
    if total // unit_bytes > MAX_UNITS:  # each unit costs the driver memory and a round trip
        smallest = 1 << max(3, (total // MAX_UNITS).bit_length())
        raise PlanError(
            f"unit size {unit_bytes} bytes cuts {total / 1e9:.3g} GB of output into more than {MAX_UNITS:,} "
            f"units: use --unit-size {smallest // 1024 if smallest >= 1024 else smallest}"
            f"{'KiB' if smallest >= 1024 else ''} or more (default 64MiB)"
        )
    cutter = _Cutter(unit_bytes, at_shards)
    for index, column in enumerate(zip(*(lay.tensors for lay in layouts))):
        if at_shards and index and any(p.shard != lay.tensors[index - 1].shard for p, lay in zip(column, layouts)):
            cutter.flush()
        cutter.add(index, column)
    cutter.flush()
    return cutter.units


class _Cutter:
    """Units in the making: small tensors grouped, large ones split at every output's hash blocks."""

    def __init__(self, unit_bytes: int, at_shards: bool) -> None:
        self.unit_bytes, self.at_shards = unit_bytes, at_shards
        self.units: list[Unit] = []
        self.pieces: list[Piece] = []
        self.filled = 0

    def flush(self) -> None:
        if self.pieces:
            self.units.append(Unit(len(self.units), tuple(self.pieces), self.filled))
        self.pieces, self.filled = [], 0

    def add(self, index: int, column: tuple[Placed, ...]) -> None:
        numel, size = _largest(column)
        small = self.at_shards and self.filled < MIN_PART  # an object's part must not end this small
        if size <= self.unit_bytes or any(in_one_piece(p.tensor) for p in column):
            if self.filled + size > self.unit_bytes and not small and not _attached(column):
                self.flush()
            self.pieces.append(Piece(index, 0, numel))
            self.filled += size
            return
        if not small:  # else the small tensors before it join its first piece
            self.flush()
        base = self.filled
        per = self.unit_bytes // min(ITEMSIZE[p.tensor.out_dtype] for p in column)
        for first in range(0, numel, per):
            last = min(numel, first + per)
            self.pieces.append(Piece(index, first, last))
            self.filled = base + max(
                min(p.nbytes, last * ITEMSIZE[p.tensor.out_dtype]) - first * ITEMSIZE[p.tensor.out_dtype]
                for p in column
            )
            if last - first == per:
                self.flush()
                base = 0


_SHAPE, _NBYTES = operator.attrgetter("tensor.shape"), operator.attrgetter("nbytes")


def _largest(column: tuple[Placed, ...]) -> tuple[int, int]:
    """The largest element count and byte size of a tensor's outputs (their shapes counted once: the outputs of a
    batch mostly share them; a 45 k-tensor plan cuts 45 k columns)."""
    if len(column) == 1:
        return column[0].tensor.numel, column[0].nbytes
    return max(map(math.prod, set(map(_SHAPE, column)))), max(map(_NBYTES, column))


def _attached(column: tuple[Placed, ...]) -> bool:
    """A scale tensor: its weight's unit computes it, so no unit may end before it."""
    return any(p.tensor.rule == SCALE_RULE for p in column)
