"""The manifest: one Arrow row per output tensor (plan + what execution measured), and verification."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ..dtypes import is_float
from ..errors import VerifyError
from ..exec.messages import SegmentResult
from ..kernels.stats import Stats
from ..planning.layout import Layout
from .location import Where, open_output

MANIFEST_NAME = "manifest.parquet"
META_KEY = b"chatvec"
HASH_ALGORITHM = "xxh3-128 of the concatenated xxh3-128 digests of each block_bytes block"

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
        ("density", pa.list_(pa.float64())),  # DARE/TIES: each vector's kept share of the merged elements
        ("sign_agreement", pa.float64()),  # TIES: share of kept nonzero entries with the elected sign
    ]
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


@dataclass
class _Entry:
    """One output tensor's block digests, in block order (16 bytes per block: the driver's memory grows with the
    output's size by 16 bytes per block, not a dict entry per block), and what its pieces reported."""

    digests: bytearray
    seen: bytearray  # 1 for each block reported
    # per piece (keyed by its first block), so that a piece computed again replaces, never adds
    parts: dict[int, Part] = field(default_factory=dict)

    @classmethod
    def of(cls, nblocks: int) -> _Entry:
        return cls(bytearray(DIGEST * nblocks), bytearray(nblocks))


class Tally:
    """One output's per-tensor totals, gathered on the driver (memory grows with tensors, not bytes)."""

    def __init__(self, layout: Layout, block_bytes: int) -> None:
        self.layout = layout
        self.block_bytes = block_bytes
        self.entries = [_Entry.of(max(1, math.ceil(p.nbytes / block_bytes))) for p in layout.tensors]

    def add(self, seg: SegmentResult, worker: str, node: str, seconds: float) -> None:
        e = self.entries[seg.index]
        for b, digest in seg.blocks:
            e.digests[b * DIGEST : (b + 1) * DIGEST] = digest
            e.seen[b] = 1
        e.parts[seg.blocks[0][0]] = Part(seg.stats, seconds, worker, node)

    def nonfinite(self) -> list[tuple[str, int, int]]:
        """(tensor, NaN count, Inf count) of every output tensor holding non-finite values."""
        found = []
        for placed, e in zip(self.layout.tensors, self.entries):
            nan = sum(p.stats.nan for p in e.parts.values())
            inf = sum(p.stats.inf for p in e.parts.values())
            if nan or inf:
                found.append((placed.tensor.name, nan, inf))
        return found

    def table(self, target: str, metadata: dict) -> pa.Table:
        rows = []
        for placed, e in zip(self.layout.tensors, self.entries):
            t, s = placed.tensor, Stats()
            for part in e.parts.values():
                s.add(part.stats)
            expected = max(1, math.ceil(placed.nbytes / self.block_bytes))
            if len(e.seen) != expected or not all(e.seen):
                raise VerifyError(f"internal: {sum(e.seen)} of {expected} blocks were reported", tensor=t.name)
            measured = t.cp is None or t.rule != "copy" or t.cp.dtype != t.out_dtype
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
                    "hash": tensor_hash([bytes(e.digests)]),
                    "cp_norm": cp_norm,
                    "delta_norm": math.sqrt(s.delta_sq) if t.terms else None,
                    "rel_update": (math.sqrt(s.update_sq) / cp_norm if cp_norm else None) if t.terms else None,
                    "nan_count": s.nan if counted else None,
                    "inf_count": s.inf if counted else None,
                    "worker": ",".join(sorted({p.worker for p in e.parts.values()})),
                    "node": ",".join(sorted({p.node for p in e.parts.values()})),
                    "seconds": sum(p.seconds for p in e.parts.values()),
                    "density": [k / t.merge_elems for k in s.kept] if s.kept and t.merge_elems else None,
                    "sign_agreement": (s.agree / s.signed if s.signed else None) if t.ties is not None else None,
                }
            )
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        meta = dict(
            metadata,
            hash={"algorithm": HASH_ALGORITHM, "block_bytes": self.block_bytes},
            rows_sha256=rows_digest(table),
        )
        meta["meta_sha256"] = meta_digest(meta)
        return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def rows_digest(table: pa.Table) -> str:
    """A checksum of the manifest's rows, stored in its metadata, so an edited manifest is detected."""
    return hashlib.sha256(json.dumps(table.to_pylist(), sort_keys=True, default=str).encode()).hexdigest()


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
    if not table.schema.remove_metadata().equals(SCHEMA):  # a column renamed or retyped (a flipped bit)
        raise DamagedManifest("manifest columns are not chatvec's (damaged?)", file=str(path))
    block = (
        meta.get("hash", {}).get("block_bytes")
        if isinstance(meta, dict) and isinstance(meta.get("hash"), dict)
        else None
    )
    if not (isinstance(block, int) and block > 0 and isinstance(meta.get("rows_sha256"), str)):
        raise DamagedManifest("manifest metadata is malformed", file=str(path))
    return table.replace_schema_metadata(None), meta
