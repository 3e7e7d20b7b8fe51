"""The manifest: one Arrow row per output tensor (plan + what execution measured), and verification."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, is_, is_not, itemgetter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ..errors import VerifyError
from ..exec.messages import SegmentResult
from ..exec.source_digests import SOURCE_ALGORITHM, Blocks, extents, source_block_elems, source_blocks
from ..kernels.stats import Stats
from ..planning.layout import Layout
from .columns_digest import ROWS_ALGORITHM, columns_digest
from .location import Where, open_output
from .manifest_columns import layout_columns, measured_columns, measured_digests
from .segment_columns import SegmentColumns, gather
from .totals import FLOAT_STATS, INT_STATS, Totals

MANIFEST_NAME = "manifest.parquet"
META_KEY = b"chatvec"
HASH_ALGORITHM = "xxh3-128 of the concatenated xxh3-128 digests of each block_bytes block"

# One source tensor the output tensor was made from: its role (`cp`, `chat[i]` / `base[i]`: the plus and minus of
# the recipe's i-th vector), where its bytes are (file, byte offset, bytes read) and their digest (SOURCE_ALGORITHM);
# a vector's MoE experts mapped from the other layout (planning/experts.py) are read in `segments`, end to end.
SOURCE_SEGMENT = pa.struct([("file", pa.string()), ("offset", pa.int64()), ("nbytes", pa.int64())])
SOURCE_DIGEST = pa.struct(
    [
        ("role", pa.string()),
        ("file", pa.string()),
        ("offset", pa.int64()),
        ("nbytes", pa.int64()),
        ("dtype", pa.string()),
        ("hash", pa.string()),
        ("segments", pa.list_(SOURCE_SEGMENT)),
    ]
)
SCHEMA = pa.schema(
    [
        ("target", pa.string()),
        ("tensor", pa.string()),
        ("rule", pa.string()),
        ("reason", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("dtype_out", pa.string()),
        ("dtype_cp", pa.string()),
        ("dtypes_vector", pa.list_(pa.string())),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("nbytes", pa.int64()),
        ("hash", pa.string()),
        ("cp_norm", pa.float64()),
        ("delta_norm", pa.float64()),
        ("rel_update", pa.float64()),
        ("nan_count", pa.int64()),
        ("inf_count", pa.int64()),
        ("worker", pa.string()),
        ("node", pa.string()),
        ("seconds", pa.float64()),
        ("alphas", pa.list_(pa.float64())),  # each vector's alpha in this tensor (alpha rules); null: not combined
        ("token_rows", pa.int64()),
        ("source_digests", pa.list_(SOURCE_DIGEST)),
        ("density", pa.list_(pa.float64())),  # DARE/TIES: each vector's kept share of the merged elements
        ("sign_agreement", pa.float64()),  # TIES: share of kept nonzero entries with the elected sign
    ]
)
FIRST_COLUMNS = 20  # the first manifests' (target … seconds); every later column is appended
_DIGESTS_AT = SCHEMA.get_field_index("source_digests")
_BEFORE_SEGMENTS = SCHEMA.set(  # as written before source digests had `segments`, their last field
    _DIGESTS_AT, pa.field("source_digests", pa.list_(pa.struct(list(SOURCE_DIGEST)[:-1])))
)


def is_chatvec_schema(schema: pa.Schema) -> bool:
    """SCHEMA, or the first columns of it that an earlier version wrote."""
    n = len(schema)
    return FIRST_COLUMNS <= n <= len(SCHEMA) and any(
        schema.equals(pa.schema(list(s)[:n])) for s in (SCHEMA, _BEFORE_SEGMENTS)
    )


def tensor_hash(blocks: list[bytes]) -> str:
    return xxhash.xxh3_128_hexdigest(b"".join(blocks))


class Part(NamedTuple):
    """What one piece of a tensor reported."""

    stats: Stats
    seconds: float
    worker: str
    node: str


DIGEST = 16  # bytes of an xxh3-128 digest


class _Digests:
    """One tensor's (or source tensor's) block digests as they arrive, folded into its hash by the last one: 16
    bytes per block while some are missing, then none (the driver's memory grows with tensors, not bytes). A block
    reported again once folded (a unit redone after its worker died) is the same bytes: the work is
    deterministic on inputs that `job` checks did not change."""

    __slots__ = ("blocks", "missing", "digests", "seen", "hash")

    def __init__(self, blocks: int) -> None:
        self.blocks = self.missing = blocks
        self.digests: bytearray | None = None  # made with the first block
        self.seen: bytearray | None = None
        self.hash: str | None = None

    def add(self, blocks: tuple[tuple[int, bytes], ...]) -> None:
        if self.hash is not None:
            return
        if self.blocks == len(blocks) == 1:  # most tensors: one block, folded at once
            self.hash, self.missing = tensor_hash([blocks[0][1]]), 0
            return
        if self.digests is None or self.seen is None:
            self.digests, self.seen = bytearray(DIGEST * self.blocks), bytearray(self.blocks)
        for b, digest in blocks:
            self.digests[b * DIGEST : (b + 1) * DIGEST] = digest
            self.missing -= not self.seen[b]
            self.seen[b] = 1
        if not self.missing:
            self.hash = tensor_hash([bytes(self.digests)])
            self.digests = self.seen = None

    def reported(self) -> int:
        return self.blocks - self.missing


@dataclass
class _Entry:
    """A tensor of several hash blocks (or with a source of several): its block digests, and what its pieces
    reported, as they arrive; both folded once all blocks arrived."""

    digests: _Digests
    # per piece (keyed by its first block), so that a piece computed again replaces, never adds
    parts: dict[int, Part] = field(default_factory=dict)
    # per source (PlannedTensor.srcs order): its source hash blocks' digests
    sources: list[_Digests] = field(default_factory=list)

    @classmethod
    def of(cls, nblocks: int, source_blocks: list[int]) -> _Entry:
        return cls(_Digests(nblocks), {}, [_Digests(n) for n in source_blocks])

    def fold(self) -> Part:
        """Once every block arrived: the parts as one (a piece reported again later is the same work)."""
        if len(self.parts) == 1:  # most tensors: one piece
            (part,) = self.parts.values()
            return part._replace(seconds=float(part.seconds))
        stats = Stats()
        for part in self.parts.values():
            stats.add(part.stats)
        parts = self.parts.values()
        workers, nodes = (",".join(sorted({getattr(p, k) for p in parts})) for k in ("worker", "node"))
        return Part(stats, float(sum(p.seconds for p in parts)), workers, nodes)


_ONE, _FIRST, _DIGEST = {1}, itemgetter(0), itemgetter(1)  # one block; a segment's first block; its digest


class SharedHashes(dict[int, tuple[str, ...] | None]):
    """Source hashes (None: some source not of one block) by the id of a segment's `sources` object, while the
    unit's result that holds them is alive (ids of live objects are unique); and the last sources column looked up
    with each of its segments' hashes: a sweep's outputs bring the very same objects, in the same order."""

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[Sequence, list] = ((), [])

    def of(self, column: Sequence[tuple[Blocks, ...]]) -> list[tuple[str, ...] | None]:
        """Each segment's source hashes (`_single_hashes`)."""
        last, found = self.last
        if len(last) == len(column) and all(map(is_, column, last)):
            return found
        ids = list(map(id, column))
        for key, sources in dict(zip(ids, column)).items():
            if key not in self:
                _single_hashes(sources, self)
        found = list(map(self.__getitem__, ids))
        self.last = (column, found)
        return found


def _single_hashes(sources: tuple[Blocks, ...], shared: SharedHashes) -> tuple[str, ...] | None:
    """Each source's hash (its one block's digest hashed: `tensor_hash`), or None where some source is not of one
    block; kept in `shared` for the next segment that brings the same `sources` object."""
    found = None
    if set(map(len, sources)) <= _ONE:
        found = tuple(map(xxhash.xxh3_128_hexdigest, map(_DIGEST, map(_FIRST, sources))))
    shared[id(sources)] = found
    return found


class Tally:
    """One output's per-tensor totals, gathered on the driver (memory grows with tensors, not bytes): a tensor of
    one hash block, and one of each source (most), is complete with its one segment; the others are folded from
    their pieces' block digests (`_Entry`) once all arrived."""

    def __init__(self, layout: Layout, block_bytes: int) -> None:
        self.layout = layout
        self.block_bytes = block_bytes
        self.source_elems = source_block_elems(block_bytes)
        # one block of the output (at most 8 bytes an element) and of each source: complete with its one segment
        numel = map(math.prod, map(attrgetter("shape"), map(attrgetter("tensor"), layout.tensors)))
        self.single = np.fromiter(map(self.source_elems.__ge__, numel), bool, len(layout.tensors))
        self.totals = Totals(len(layout.tensors))
        self.pending: dict[int, _Entry] = {}  # tensors of several blocks, some of them reported

    def add(self, seg: SegmentResult, worker: str, node: str, seconds: float) -> None:
        self.add_all([seg], worker, node, seconds)

    def add_all(
        self,
        segments: list[SegmentResult],
        worker: str,
        node: str,
        seconds: float,
        shared: SharedHashes | None = None,
        columns: SegmentColumns | None = None,
    ) -> None:
        """Add a unit's segments (each `seconds`; `columns`: them gathered already); `shared`: the source hashes of
        the digests objects that any output's segments of the same unit's result brought (a batch's outputs report
        the same object for the sources they share: hashed once)."""
        c = gather(segments) if columns is None else columns
        n = len(c.index)
        if not n:
            return
        sources = (SharedHashes() if shared is None else shared).of(c.sources)
        index = np.fromiter(c.index, np.intp, n)
        one = np.fromiter(map(_ONE.__contains__, map(len, c.blocks)), bool, n)
        quick = self.single[index] & one & ~self.totals.done[index]
        quick &= np.fromiter(map(is_not, sources, repeat(None)), bool, n)
        if self.pending:
            quick &= ~np.isin(index, list(self.pending))
        self._add_quick(c, index, quick, sources, (float(seconds), worker, node))
        for j in np.flatnonzero(~quick).tolist():  # a tensor of several blocks, or with a source of several
            if not self.totals.done[c.index[j]]:  # else the same bytes again (a unit redone: see _Digests)
                self._add_piece(c.index[j], c.blocks[j], c.stats[j], c.sources[j], worker, node, seconds)

    def _add_quick(
        self, c: SegmentColumns, index: np.ndarray, quick: np.ndarray, sources: list, made: tuple[float, str, str]
    ) -> None:
        """Store the tensors complete with their one segment (`quick`), a column at a time."""
        every = bool(quick.all())
        where = None if every else np.flatnonzero(quick)
        pick = quick.tolist()

        def picked(column: Sequence) -> Sequence:
            return column if every else list(compress(column, pick))

        def values(column: list, dtype: type) -> np.ndarray:
            found: np.ndarray = np.fromiter(column, dtype, len(column))
            return found if where is None else found[where]

        t, at = self.totals, index[quick]
        k = len(at)
        t.hashes[at] = np.fromiter(
            map(xxhash.xxh3_128_hexdigest, map(_DIGEST, map(_FIRST, picked(c.blocks)))), object, k
        )
        t.source_hashes[at] = np.fromiter(picked(sources), object, k)
        for name in FLOAT_STATS:
            getattr(t, name)[at] = values(c.field(name), np.float64)
        for name in INT_STATS:
            counts = c.field(name)
            getattr(t, name)[at] = values(counts, np.int64) if any(counts) else 0  # mostly all 0: set at once
        kept = c.field("kept")
        if any(kept):  # DARE, TIES
            for i, shares in zip(at.tolist(), picked(kept)):
                t.kept[i] = shares
        t.seconds[at], t.worker[at], t.node[at] = made[0], t.code(made[1]), t.code(made[2])
        t.done[at] = True

    def _add_piece(
        self, i: int, blocks: Blocks, stats: Stats, sources: tuple[Blocks, ...], worker: str, node: str, seconds: float
    ) -> None:
        """A segment of a tensor of several blocks (or with a source of several)."""
        e = self.pending.get(i)
        if e is None:
            placed = self.layout.tensors[i]
            nblocks = max(1, math.ceil(placed.nbytes / self.block_bytes))
            counts = [source_blocks(n, self.source_elems) for _, n in extents(placed.tensor)]
            e = self.pending[i] = _Entry.of(nblocks, counts)
        e.digests.add(blocks)
        e.parts[blocks[0][0]] = Part(stats, seconds, worker, node)
        for digests, found in zip(e.sources, sources):
            digests.add(found)
        if e.digests.hash is not None:
            part = e.fold()
            hashes = tuple(d.hash for d in e.sources)
            self.totals.set(i, e.digests.hash, hashes, part.stats, part.seconds, part.worker, part.node)
            del self.pending[i]

    def nonfinite(self) -> list[tuple[str, int, int]]:
        """(tensor, NaN count, Inf count) of every output tensor holding non-finite values."""
        t, found = self.totals, dict[int, tuple[int, int]]()
        for i in t.nonfinite().tolist():
            found[i] = (int(t.nan[i]), int(t.inf[i]))
        for i, e in self.pending.items():
            found[i] = (sum(p.stats.nan for p in e.parts.values()), sum(p.stats.inf for p in e.parts.values()))
        names = self.layout.tensors
        return [(names[i].tensor.name, nan, inf) for i, (nan, inf) in sorted(found.items()) if nan or inf]

    def table(self, target: str, metadata: dict) -> pa.Table:
        """The manifest: a row per tensor (columns fixed by the layout made once per layout object), and the
        metadata with the checksums of the rows (`rows_hash`) and of itself (`meta_sha256`)."""
        fixed = layout_columns(self.layout)
        measured = measured_columns(fixed, self.totals)
        columns = {"target": pa.repeat(pa.scalar(target, pa.string()), len(self.totals)), **fixed.fixed, **measured}
        table = pa.Table.from_arrays([columns[f.name] for f in SCHEMA], schema=SCHEMA)
        computed = {name: column for name, column in measured.items() if name != "source_digests"}
        known = {
            **fixed.digests,
            **measured_digests(computed),
            "source_digests": fixed.sources_digest(measured["source_digests"]),
        }
        meta = dict(
            metadata,
            hash={"algorithm": HASH_ALGORITHM, "block_bytes": self.block_bytes},
            source_hash={"algorithm": SOURCE_ALGORITHM, "block_elems": self.source_elems},
            rows_hash=rows_hash(table, known),
        )
        meta["meta_sha256"] = meta_digest(meta)
        return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def rows_hash(table: pa.Table, known: Mapping[str, bytes] | None = None) -> dict:
    """The checksum of the manifest's rows that this version writes (`rows_hash` in the metadata), so an edited
    manifest is detected: per column over a canonical encoding of the values (columns_digest.py; `known`: some
    columns' digests, as made from the arrays `table` holds)."""
    return {"algorithm": ROWS_ALGORITHM, "sha256": columns_digest(table, known)}


def rows_digest(table: pa.Table) -> str:
    """The rows checksum of manifests written before `rows_hash` (`rows_sha256`): sha256 of the rows as JSON."""
    return hashlib.sha256(json.dumps(table.to_pylist(), sort_keys=True, default=str).encode()).hexdigest()


def rows_match(table: pa.Table, meta: dict) -> bool:
    """Whether the rows match the checksum the manifest has: `rows_hash`, or an earlier version's `rows_sha256`."""
    if "rows_hash" in meta:
        return meta["rows_hash"] == rows_hash(table)
    return meta.get("rows_sha256") == rows_digest(table)


def _rows_checksum_known(meta: dict) -> bool:
    """A rows checksum of a known form: `rows_hash` with this version's algorithm, or `rows_sha256`."""
    found = meta.get("rows_hash")
    if found is None:
        return isinstance(meta.get("rows_sha256"), str)
    return isinstance(found, dict) and found.get("algorithm") == ROWS_ALGORITHM and isinstance(found.get("sha256"), str)


def meta_digest(meta: dict) -> str:
    """A checksum of the manifest's metadata (recipe, sources, rows' checksum), stored beside it."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path)


class DamagedManifest(VerifyError):
    """The manifest is there but cannot be read or trusted: for `verify`, a problem found, not a usage error."""


def read_manifest(out: Where) -> tuple[pa.Table, dict]:
    """The manifest's table and metadata, from an output folder or `s3://` prefix (or an open location)."""
    location = open_output(out)
    path = location.describe(MANIFEST_NAME)
    if not location.exists():
        raise VerifyError(location.absent, file=location.where)
    if not location.is_file(MANIFEST_NAME):
        raise VerifyError("no manifest here: not a chatvec output", file=path)
    source = location.parquet(MANIFEST_NAME)  # a read that fails (the network, access) is an error, not damage
    try:
        table = pq.read_table(source)
        table.validate(full=True)  # e.g. strings that are not UTF-8: caught here, not when a row is read
        meta = json.loads((table.schema.metadata or {})[META_KEY])
    except Exception as e:  # a damaged manifest must read as a verification failure
        raise DamagedManifest(f"manifest is unreadable ({type(e).__name__})", file=str(path)) from None
    schema = table.schema.remove_metadata()
    if not is_chatvec_schema(schema):  # a column renamed or retyped (a flipped bit)
        raise DamagedManifest("manifest columns are not chatvec's (damaged?)", file=str(path))
    block = (
        meta.get("hash", {}).get("block_bytes")
        if isinstance(meta, dict) and isinstance(meta.get("hash"), dict)
        else None
    )
    if not (isinstance(block, int) and block > 0 and _rows_checksum_known(meta)):
        raise DamagedManifest("manifest metadata is malformed", file=str(path))
    return table.replace_schema_metadata(None), meta
