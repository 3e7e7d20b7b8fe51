"""`chatvec verify`: rehash an output's shards against its manifest."""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from pathlib import Path

import pyarrow as pa
import xxhash

from ..errors import VerifyError
from ..io.checkpoint import INDEX_NAME, MAX_INDEX_BYTES, read_json_object
from ..io.header import read_header
from ..io.ranges import FileHandles, read_into
from ..planning.layout import SHARD_METADATA
from .manifest import MANIFEST_NAME, DamagedManifest, meta_digest, read_manifest, rows_digest, tensor_hash

SHARD_NAME = re.compile(r"^[\w.-]+\.safetensors$")  # what the layout names shards; anything else is not opened


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
