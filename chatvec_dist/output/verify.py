"""`chatvec verify`: check every byte of an output: tensor data against the manifest, the rest against
`checksums.json`."""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from pathlib import Path

import pyarrow as pa
import xxhash

from ..errors import VerifyError, printable
from ..io.checkpoint import INDEX_NAME, MAX_INDEX_BYTES, read_json_object
from ..io.header import read_header
from ..io.ranges import FileHandles, read_into
from ..planning.layout import SHARD_METADATA
from .digests import DIGESTS_NAME, added_files, check_file, read_digests
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
    """Check every byte of an output; return one line per problem (empty: all verified).

    Tensor data is rehashed against the manifest (a line names the tensor); the manifest's own rows and metadata
    against their checksums; the index against the manifest; and every file against `checksums.json` (size and
    sha256; a shard's header bytes, padding included): a file changed, missing or added is named. A file already
    named by a more specific line is not named again. An output without `checksums.json` (written before chatvec
    recorded file digests, or the file was deleted) gets one line saying so: only its tensors were checked.
    No manifest at all is a usage error (VerifyError), not a problem found."""
    out_dir = Path(out_dir)
    try:
        table, meta = read_manifest(out_dir)
    except DamagedManifest as e:
        problems = [str(e)]
    else:
        problems = _manifest_problems(out_dir, table, meta)
        problems += _index_problems(out_dir, table)
        problems += _tensor_problems(out_dir, table, int(meta["hash"]["block_bytes"]))
    problems += _file_problems(out_dir, problems)
    return [printable(p) for p in problems]


def _manifest_problems(out_dir: Path, table: pa.Table, meta: dict) -> list[str]:
    problems = []
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):  # absent: written before it existed
        problems.append(
            f"{out_dir / MANIFEST_NAME}: manifest metadata (recipe, sources) does not match its checksum "
            "(edited after the fact?)"
        )
    if meta.get("rows_sha256") != rows_digest(table):
        problems.append(f"{out_dir / MANIFEST_NAME}: manifest rows do not match its checksum (edited after the fact?)")
    return problems


def _file_problems(out_dir: Path, found: list[str]) -> list[str]:
    """Every file against checksums.json, but those `found` already names; then the files added."""
    files = read_digests(out_dir)
    if files is None:
        return [
            f"{out_dir / DIGESTS_NAME}: missing (an output written before chatvec recorded file digests, or the "
            "file was deleted): only the tensors and the manifest were checked"
        ]
    if isinstance(files, str):
        return [files]
    problems = []
    for name, entry in files.items():
        named = any(p.startswith(f"{out_dir / name}: ") for p in found)
        if not named and (problem := check_file(out_dir, name, entry)):
            problems.append(problem)
    return problems + added_files(out_dir, files)


def _tensor_problems(out_dir: Path, table: pa.Table, block: int) -> list[str]:
    """Rehash every tensor's bytes where its shard's header puts them (each shard's header read once)."""
    buf = memoryview(bytearray(block))
    files = FileHandles()
    headers: dict[object, dict | None] = {}  # None: the shard could not be read (reported once)
    problems: list[str] = []
    rows = table.to_pylist()
    tensors_in = Counter(row["shard"] for row in rows)
    try:
        for row in rows:
            if row["shard"] not in headers:
                headers[row["shard"]] = _shard_header(out_dir, row["shard"], tensors_in[row["shard"]], problems)
            if (header := headers[row["shard"]]) is not None:
                problems += _tensor_problem(out_dir, header, row, files, block, buf)
    finally:
        files.close()
    return problems


def _shard_header(out_dir: Path, shard: object, tensors: int, problems: list[str]) -> dict | None:
    """A shard's parsed header, or None with the reason appended to `problems`."""
    path = str(out_dir / str(shard))
    if unsafe := _unsafe_shard(out_dir, shard):
        problems.append(f"{path}: {unsafe}")
        return None
    try:
        header, metadata = read_header(path)
    except Exception as e:
        problems.append(f"{path}: unreadable shard ({e}); none of its {tensors} tensors can be checked")
        return None
    if metadata != SHARD_METADATA:  # transformers reads "format" to decide how to load the shard
        problems.append(f"{path}: header metadata {metadata} differs from {SHARD_METADATA}")
    return header


def _tensor_problem(
    out_dir: Path, header: dict, row: dict, files: FileHandles, block: int, buf: memoryview
) -> list[str]:
    """What is wrong with one tensor (its place, dtype, shape or bytes against its manifest row): [] or one line."""
    path = str(out_dir / str(row["shard"]))
    info = header.get(row["tensor"])
    if info is None:
        return [f"{path}: tensor '{row['tensor']}' is missing"]
    if (info.start, info.nbytes, info.dtype, list(info.shape)) != (
        row["offset"],
        row["nbytes"],
        row["dtype_out"],
        row["shape"],
    ):
        return [f"{path}: tensor '{row['tensor']}' has a different place, dtype or shape than the manifest"]
    try:
        digest = hash_range(files, path, row["offset"], row["nbytes"], block, buf, row["tensor"])
    except Exception as e:
        return [str(e)]
    if digest != row["hash"]:
        return [f"{path}: tensor '{row['tensor']}' content differs from the manifest"]
    return []


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
