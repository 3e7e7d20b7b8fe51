"""The manifest: one Arrow row per output tensor (plan + what execution measured), and verification."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from .dtypes import is_float
from .errors import VerifyError
from .exec.messages import SegmentResult
from .io.checkpoint import INDEX_NAME, MAX_INDEX_BYTES, read_json_object
from .io.header import read_header
from .io.ranges import FileHandles, read_into
from .kernels.stats import Stats
from .planning.layout import SHARD_METADATA, Layout

MANIFEST_NAME = "manifest.parquet"
META_KEY = b"chatvec"
SHARD_NAME = re.compile(r"^[\w.-]+\.safetensors$")  # what the layout names shards; anything else is not opened
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
    ]
)


def tensor_hash(blocks: list[bytes]) -> str:
    return xxhash.xxh3_128_hexdigest(b"".join(blocks))


@dataclass
class _Entry:
    blocks: dict[int, bytes] = field(default_factory=dict)
    # per piece (keyed by its first block), so that a piece computed again replaces, never adds
    parts: dict[int, tuple[Stats, float, str, str]] = field(default_factory=dict)


class Tally:
    """One output's per-tensor totals, gathered on the driver (memory grows with tensors, not bytes)."""

    def __init__(self, layout: Layout, block_bytes: int) -> None:
        self.layout = layout
        self.block_bytes = block_bytes
        self.entries = [_Entry() for _ in layout.tensors]

    def add(self, seg: SegmentResult, worker: str, node: str, seconds: float) -> None:
        e = self.entries[seg.index]
        e.blocks.update(seg.blocks)
        e.parts[seg.blocks[0][0]] = (seg.stats, seconds, worker, node)

    def nonfinite(self) -> list[tuple[str, int, int]]:
        """(tensor, NaN count, Inf count) of every output tensor holding non-finite values."""
        found = []
        for placed, e in zip(self.layout.tensors, self.entries):
            nan = sum(p[0].nan for p in e.parts.values())
            inf = sum(p[0].inf for p in e.parts.values())
            if nan or inf:
                found.append((placed.tensor.name, nan, inf))
        return found

    def table(self, target: str, metadata: dict) -> pa.Table:
        rows = []
        for placed, e in zip(self.layout.tensors, self.entries):
            t, s = placed.tensor, Stats()
            for stats, _, _, _ in e.parts.values():
                s.add(stats)
            expected = max(1, math.ceil(placed.nbytes / self.block_bytes))
            if sorted(e.blocks) != list(range(expected)):
                raise VerifyError(f"internal: {len(e.blocks)} of {expected} blocks were reported", tensor=t.name)
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
                    "hash": tensor_hash([e.blocks[b] for b in range(expected)]),
                    "cp_norm": cp_norm,
                    "delta_norm": math.sqrt(s.delta_sq) if t.terms else None,
                    "rel_update": (math.sqrt(s.update_sq) / cp_norm if cp_norm else None) if t.terms else None,
                    "nan_count": s.nan if counted else None,
                    "inf_count": s.inf if counted else None,
                    "worker": ",".join(sorted({p[2] for p in e.parts.values()})),
                    "node": ",".join(sorted({p[3] for p in e.parts.values()})),
                    "seconds": sum(p[1] for p in e.parts.values()),
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


def read_manifest(out_dir: str | os.PathLike) -> tuple[pa.Table, dict]:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise VerifyError("no manifest here: not a chatvec output", file=str(path))
    try:
        table = pq.read_table(path)
        table.validate(full=True)  # e.g. strings that are not UTF-8: caught here, not when a row is read
        meta = json.loads((table.schema.metadata or {})[META_KEY])
    except Exception as e:  # a damaged manifest must read as a verification failure
        raise DamagedManifest(f"manifest is unreadable ({type(e).__name__})", file=str(path)) from None
    block = (
        meta.get("hash", {}).get("block_bytes")
        if isinstance(meta, dict) and isinstance(meta.get("hash"), dict)
        else None
    )
    if not (isinstance(block, int) and block > 0 and isinstance(meta.get("rows_sha256"), str)):
        raise DamagedManifest("manifest metadata is malformed", file=str(path))
    return table.replace_schema_metadata(None), meta


def read_digest(files: FileHandles, path: str, offset: int, nbytes: int, buf: memoryview, name: str) -> bytes:
    """The xxh3-128 digest of `nbytes` at `offset` of `path`, read into `buf`."""
    read_into(files.get(path), buf[:nbytes], offset, path, name)
    return xxhash.xxh3_128_digest(buf[:nbytes])


def hash_range(files: FileHandles, path: str, offset: int, nbytes: int, block: int, buf: memoryview, name: str) -> str:
    """Hash `nbytes` at `offset` of `path` as the manifest does, reading block by block."""
    return tensor_hash(
        [
            read_digest(files, path, offset + start, min(block, nbytes - start), buf, name)
            for start in range(0, max(nbytes, 1), block)
        ]
    )


def verify(out_dir: str | os.PathLike) -> list[str]:
    """Rehash every tensor against the manifest; return one line per problem (empty: all verified)."""
    out_dir = Path(out_dir)
    try:
        table, meta = read_manifest(out_dir)
    except DamagedManifest as e:
        return [str(e)]
    problems = []
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):  # absent: written before it existed
        problems.append(
            f"{out_dir / MANIFEST_NAME}: manifest metadata (recipe, sources) does not match its checksum "
            "(edited after the fact?)"
        )
    if meta.get("rows_sha256") != rows_digest(table):
        problems.append(f"{out_dir / MANIFEST_NAME}: manifest rows do not match its checksum (edited after the fact?)")
    block = int(meta["hash"]["block_bytes"])
    buf = memoryview(bytearray(block))
    files = FileHandles()
    headers: dict[str, dict | None] = {}  # None: the shard could not be read (reported once)
    problems += _index_problems(out_dir, table)
    rows = table.to_pylist()
    tensors_in = Counter(row["shard"] for row in rows)
    try:
        for row in rows:
            path = str(out_dir / str(row["shard"]))
            if row["shard"] not in headers and (unsafe := _unsafe_shard(out_dir, row["shard"])):
                headers[row["shard"]] = None
                problems.append(f"{path}: {unsafe}")
            if row["shard"] not in headers:
                try:
                    headers[row["shard"]], metadata = read_header(path)
                except Exception as e:
                    headers[row["shard"]] = None
                    problems.append(
                        f"{path}: unreadable shard ({e}); none of its {tensors_in[row['shard']]} tensors can be checked"
                    )
                else:
                    if metadata != SHARD_METADATA:  # transformers reads "format" to decide how to load the shard
                        problems.append(f"{path}: header metadata {metadata} differs from {SHARD_METADATA}")
            if headers[row["shard"]] is None:
                continue  # reported once for the shard, not again for each of its tensors
            info = headers[row["shard"]].get(row["tensor"])
            if info is None:
                problems.append(f"{path}: tensor '{row['tensor']}' is missing")
                continue
            if (info.start, info.nbytes, info.dtype, list(info.shape)) != (
                row["offset"],
                row["nbytes"],
                row["dtype_out"],
                row["shape"],
            ):
                problems.append(
                    f"{path}: tensor '{row['tensor']}' has a different place, dtype or shape than the manifest"
                )
                continue
            try:
                digest = hash_range(files, path, row["offset"], row["nbytes"], block, buf, row["tensor"])
            except Exception as e:
                problems.append(str(e))
                continue
            if digest != row["hash"]:
                problems.append(f"{path}: tensor '{row['tensor']}' content differs from the manifest")
    finally:
        files.close()
    return problems


def _unsafe_shard(out_dir: Path, shard: object) -> str | None:
    """Why a shard name read from the manifest must not be opened (a path out, a FIFO, a link), or None."""
    if not isinstance(shard, str) or not SHARD_NAME.match(shard):
        return "manifest names an unsafe shard path (only plain *.safetensors names inside the output)"
    try:
        mode = os.lstat(out_dir / shard).st_mode
    except OSError:
        return None  # missing: reported as an unreadable shard
    return None if stat.S_ISREG(mode) else "not a regular file (a link, FIFO or directory): not opened"


def _index_problems(out_dir: Path, table: pa.Table) -> list[str]:
    """The index must place every tensor where the manifest does (transformers loads through it)."""
    index = out_dir / INDEX_NAME
    try:
        weight_map = read_json_object(index, VerifyError, MAX_INDEX_BYTES).get("weight_map")
    except VerifyError as e:
        return [str(e)]
    expected = dict(zip(table.column("tensor").to_pylist(), table.column("shard").to_pylist()))
    return [] if weight_map == expected else [f"{index}: weight_map does not place the tensors as the manifest does"]
