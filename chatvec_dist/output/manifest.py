"""The manifest: one Arrow row per output tensor (plan + what execution measured), and verification."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ..dtypes import ITEMSIZE, is_float
from ..errors import VerifyError
from ..exec.messages import SegmentResult
from ..exec.source_digests import SOURCE_ALGORITHM, extents, source_block_elems, source_blocks
from ..kernels.stats import Stats
from ..planning.experts import read_ranges
from ..planning.layout import Layout
from ..planning.planner import PlannedTensor
from .location import Where, open_output

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
    """One output tensor's block digests, and what its pieces reported: both folded once all blocks arrived."""

    digests: _Digests
    # per piece (keyed by its first block), so that a piece computed again replaces, never adds
    parts: dict[int, Part] = field(default_factory=dict)
    # per source (PlannedTensor.srcs order): its source hash blocks' digests
    sources: list[_Digests] = field(default_factory=list)
    total: Part | None = None  # once complete: the pieces' stats and seconds summed, their workers and nodes

    @classmethod
    def of(cls, nblocks: int, source_blocks: list[int]) -> _Entry:
        return cls(_Digests(nblocks), {}, [_Digests(n) for n in source_blocks])

    def fold(self) -> None:
        """Once every block arrived: the parts as one (a piece reported again later is the same work)."""
        if len(self.parts) == 1:  # most tensors: one piece
            (part,) = self.parts.values()
            self.total, self.parts = part._replace(seconds=float(part.seconds)), {}
            return
        stats = Stats()
        for part in self.parts.values():
            stats.add(part.stats)
        parts = self.parts.values()
        workers, nodes = (",".join(sorted({getattr(p, k) for p in parts})) for k in ("worker", "node"))
        self.total = Part(stats, float(sum(p.seconds for p in parts)), workers, nodes)
        self.parts = {}


class Tally:
    """One output's per-tensor totals, gathered on the driver (memory grows with tensors, not bytes)."""

    def __init__(self, layout: Layout, block_bytes: int) -> None:
        self.layout = layout
        self.block_bytes = block_bytes
        self.source_elems = source_block_elems(block_bytes)
        self.entries = [
            _Entry.of(
                max(1, math.ceil(p.nbytes / block_bytes)),
                [source_blocks(n, self.source_elems) for _, n in extents(p.tensor)],
            )
            for p in layout.tensors
        ]

    def add(self, seg: SegmentResult, worker: str, node: str, seconds: float) -> None:
        e = self.entries[seg.index]
        if e.total is not None:
            return  # the same bytes again (a unit redone after its worker died; see _Digests)
        e.digests.add(seg.blocks)
        e.parts[seg.blocks[0][0]] = Part(seg.stats, seconds, worker, node)
        for digests, blocks in zip(e.sources, seg.sources):
            digests.add(blocks)
        if e.digests.hash is not None:
            e.fold()

    def nonfinite(self) -> list[tuple[str, int, int]]:
        """(tensor, NaN count, Inf count) of every output tensor holding non-finite values."""
        found = []
        for placed, e in zip(self.layout.tensors, self.entries):
            parts = [e.total] if e.total is not None else e.parts.values()
            nan = sum(p.stats.nan for p in parts)
            inf = sum(p.stats.inf for p in parts)
            if nan or inf:
                found.append((placed.tensor.name, nan, inf))
        return found

    def table(self, target: str, metadata: dict) -> pa.Table:
        rows = []
        for placed, e in zip(self.layout.tensors, self.entries):
            t, total = placed.tensor, e.total
            if total is None or e.digests.hash is None:
                what = f"{e.digests.reported()} of {e.digests.blocks} blocks"
                raise VerifyError(f"internal: {what} were reported", tensor=t.name)
            s = total.stats
            measured = t.cp is None or t.rule != "copy" or t.cp.dtype != t.out_dtype or bool(t.rows)
            changed = bool(t.terms or t.rows)  # an update to report: the vectors, or chat-template token rows
            cp_norm = math.sqrt(s.cp_sq) if measured and t.cp is not None else None
            counted = is_float(t.out_dtype)  # NaN/Inf: every float tensor, copies as stored too
            rows.append(
                {
                    "target": target,
                    "tensor": t.name,
                    "rule": t.rule,
                    "reason": t.reason,
                    "shape": list(t.shape),
                    "dtype_out": t.out_dtype,
                    "dtype_cp": t.cp.dtype if t.cp else None,
                    "dtypes_vector": [src.dtype for src in t.vector_srcs],
                    "shard": self.layout.shards[placed.shard].name,
                    "offset": placed.offset,
                    "nbytes": placed.nbytes,
                    "hash": e.digests.hash,
                    "cp_norm": cp_norm,
                    "delta_norm": math.sqrt(s.delta_sq) if t.terms else None,
                    "rel_update": (math.sqrt(s.update_sq) / cp_norm if cp_norm else None) if changed else None,
                    "nan_count": s.nan if counted else None,
                    "inf_count": s.inf if counted else None,
                    "worker": total.worker,
                    "node": total.node,
                    "seconds": total.seconds,
                    "alphas": [float(term.alpha) for term in t.terms] if t.terms else None,
                    "token_rows": len(t.rows),
                    "source_digests": source_digests(t, e),
                    "density": [k / t.merge_elems for k in s.kept] if s.kept and t.merge_elems else None,
                    "sign_agreement": (s.agree / s.signed if s.signed else None) if t.ties is not None else None,
                }
            )
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        meta = dict(
            metadata,
            hash={"algorithm": HASH_ALGORITHM, "block_bytes": self.block_bytes},
            source_hash={"algorithm": SOURCE_ALGORITHM, "block_elems": self.source_elems},
            rows_sha256=_digest_of(rows),  # the rows as the table gives them back (floats as floats): not read again
        )
        meta["meta_sha256"] = meta_digest(meta)
        return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def source_roles(t: PlannedTensor) -> list[str]:
    """Each source's role, in `extents` order: `cp`, then `chat[i]` and `base[i]` for the recipe's i-th vector (an
    applied vector's plus side is its `chat[i]`); then `ROLE.scale`, the float32 scales of each block-scaled FP8
    one; then `chat[0].row[N]`, each chat row N that token rows are taken from."""
    roles = list(_roles(t.cp is not None, tuple(minus is not None for _, _, minus in t.terms)))
    scaled = [f"{role}.scale" for role, src in zip(roles, t.srcs) if src.scale is not None]  # row_src: past roles
    return roles + scaled + [f"chat[0].row[{chat}]" for _, chat in t.rows]


@functools.lru_cache(maxsize=64)
def _roles(cp: bool, minus: tuple[bool, ...]) -> tuple[str, ...]:
    """The roles of a tensor with or without CP and terms with or without a minus side (a few shapes per job)."""
    roles = ["cp"] if cp else []
    for i, has_minus in enumerate(minus):
        roles += [f"chat[{i}]"] + ([f"base[{i}]"] if has_minus else [])
    return tuple(roles)


def source_digests(t: PlannedTensor, e: _Entry) -> list[dict]:
    """The `source_digests` cell of a tensor: each source's role, place, extent and digest."""
    found = []
    for role, (src, extent), digests in zip(source_roles(t), extents(t), e.sources):
        if digests.hash is None:
            what = f"{digests.reported()} of {digests.blocks} blocks of its {role}"
            raise VerifyError(f"internal: {what} were reported", tensor=t.name)
        nbytes = extent * ITEMSIZE[src.dtype]
        found.append(
            dict(
                role=role,
                file=src.path,
                offset=src.start,
                nbytes=nbytes,
                dtype=src.dtype,
                hash=digests.hash,
                segments=[dict(file=p, offset=o, nbytes=n) for p, o, n in read_ranges(src, 0, extent)]
                if src.segments
                else None,
            )
        )
    return found


def rows_digest(table: pa.Table) -> str:
    """A checksum of the manifest's rows, stored in its metadata, so an edited manifest is detected."""
    return _digest_of(table.to_pylist())


def _digest_of(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


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
    if not (isinstance(block, int) and block > 0 and isinstance(meta.get("rows_sha256"), str)):
        raise DamagedManifest("manifest metadata is malformed", file=str(path))
    return table.replace_schema_metadata(None), meta
