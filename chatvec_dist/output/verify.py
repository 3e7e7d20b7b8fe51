"""`chatvec verify`: check every byte of an output: tensor data against the manifest, the rest against
`checksums.json`."""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import xxhash

from ..errors import ChatvecError, printable
from ..io.checkpoint import INDEX_NAME, MAX_INDEX_BYTES
from ..io.ranges import FileHandles, read_into
from ..planning.layout import SHARD_METADATA
from .digests import DIGESTS_NAME, added_files, check_file, read_digests
from .location import NotPlain, OutputLocation, Where, open_output
from .manifest import MANIFEST_NAME, DamagedManifest, meta_digest, read_manifest, rows_match, tensor_hash
from .source_check import source_problems

SHARD_NAME = re.compile(r"^[\w.-]+\.safetensors$")  # what the layout names shards; anything else is not opened
SHARDS_IN_FLIGHT = 4  # shards read and hashed at once (reads and xxh3 release the GIL)


def read_digest(files: FileHandles, path: str, offset: int, nbytes: int, buf: memoryview, name: str) -> bytes:
    """The xxh3-128 digest of `nbytes` at `offset` of `path`, read into `buf`."""
    read_into(files.get(path), buf[:nbytes], offset, path, name)
    return xxhash.xxh3_128_digest(buf[:nbytes])


def verify(out: Where, shards_in_flight: int = SHARDS_IN_FLIGHT, sources: bool = False) -> list[str]:
    """Check every byte of an output (a folder or an `s3://` prefix); return one line per problem (empty: all
    verified).

    Tensor data is rehashed against the manifest (a line names the tensor); the manifest's own rows and metadata
    against their checksums; the index against the manifest; and every file against `checksums.json` (size and
    sha256; a shard's header bytes, padding included): a file changed, missing or added is named. A file already
    named by a more specific line is not named again. An output without `checksums.json` (written before chatvec
    recorded file digests, or the file was deleted) gets one line saying so: only its tensors were checked.
    No manifest at all is a usage error (VerifyError), not a problem found. Shards are read `shards_in_flight`
    at a time; the lines come in the same order whatever that number (the manifest's row order).

    With `sources`, then every source tensor the manifest records is reread and rehashed (source_check.py)."""
    with open_output(out) as location, ThreadPoolExecutor(shards_in_flight, thread_name_prefix="verify") as pool:
        checked = None
        try:
            table, meta = read_manifest(location)
        except DamagedManifest as e:
            problems = [str(e)]
        else:
            checked = table, meta
            problems = _manifest_problems(location, table, meta)
            problems += _index_problems(location, table)
            problems += _tensor_problems(location, table, int(meta["hash"]["block_bytes"]), pool)
        problems += _file_problems(location, problems, pool)
        if sources and checked is not None:
            problems += source_problems(*checked, location.describe(MANIFEST_NAME), pool)
    return [printable(p) for p in problems]


def _manifest_problems(location: OutputLocation, table: pa.Table, meta: dict) -> list[str]:
    where = location.describe(MANIFEST_NAME)
    problems = []
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):  # absent: written before it existed
        problems.append(
            f"{where}: manifest metadata (recipe, sources) does not match its checksum (edited after the fact?)"
        )
    if not rows_match(table, meta):
        problems.append(f"{where}: manifest rows do not match its checksum (edited after the fact?)")
    return problems


def _file_problems(location: OutputLocation, found: list[str], pool: ThreadPoolExecutor) -> list[str]:
    """Every file against checksums.json, but those `found` already names; then the files added."""
    files = read_digests(location)
    if files is None:
        return [
            f"{location.describe(DIGESTS_NAME)}: missing (an output written before chatvec recorded file digests, "
            "or the file was deleted): only the tensors and the manifest were checked"
        ]
    if isinstance(files, str):
        return [files]
    named = {name for name in files if any(p.startswith(f"{location.describe(name)}: ") for p in found)}
    checked = pool.map(lambda item: check_file(location, *item), [e for e in files.items() if e[0] not in named])
    return [problem for problem in checked if problem] + added_files(location, files)


def _tensor_problems(location: OutputLocation, table: pa.Table, block: int, pool: ThreadPoolExecutor) -> list[str]:
    """Rehash every tensor's bytes where its shard's header puts them: shards in parallel, each header read once,
    each tensor's bytes once; the lines in the manifest's row order."""
    rows = list(enumerate(table.to_pylist()))
    by_shard: dict[object, list[tuple[int, dict]]] = {}
    for i, row in rows:
        by_shard.setdefault(row["shard"], []).append((i, row))
    found = pool.map(lambda shard_rows: _shard_problems(location, shard_rows, block), by_shard.values())
    ordered = sorted(itertools.chain.from_iterable(found), key=lambda line: line[0])  # stable: a shard's own order
    return [line for _, line in ordered]


def _shard_problems(location: OutputLocation, rows: list[tuple[int, dict]], block: int) -> list[tuple[int, str]]:
    """(row index, line) for one shard's header, then for each of its tensors."""
    first, shard = rows[0][0], rows[0][1]["shard"]
    problems: list[str] = []
    header = _shard_header(location, shard, len(rows), problems)
    found = [(first, line) for line in problems]
    if header is not None:
        window = max(1, location.chunk // block) * block
        buf = memoryview(bytearray(window))
        try:
            found += [(i, line) for i, row in rows for line in _tensor_problem(location, header, row, block, buf)]
        finally:
            location.release(str(shard))
    return found


def _shard_header(location: OutputLocation, shard: object, tensors: int, problems: list[str]) -> dict | None:
    """A shard's parsed header, or None with the reason appended to `problems`."""
    path = location.describe(str(shard))
    if unsafe := _unsafe_shard(location, shard):
        problems.append(f"{path}: {unsafe}")
        return None
    try:
        header, metadata = location.header(str(shard))
    except Exception as e:
        problems.append(f"{path}: unreadable shard ({e}); none of its {tensors} tensors can be checked")
        return None
    if metadata != SHARD_METADATA:  # transformers reads "format" to decide how to load the shard
        problems.append(f"{path}: header metadata {metadata} differs from {SHARD_METADATA}")
    return header


def _tensor_problem(location: OutputLocation, header: dict, row: dict, block: int, buf: memoryview) -> list[str]:
    """What is wrong with one tensor (its place, dtype, shape or bytes against its manifest row): [] or one line."""
    path = location.describe(str(row["shard"]))
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
        digest = hash_range(location, row["shard"], row["offset"], row["nbytes"], block, buf, row["tensor"])
    except Exception as e:
        return [str(e)]
    if digest != row["hash"]:
        return [f"{path}: tensor '{row['tensor']}' content differs from the manifest"]
    return []


def hash_range(
    location: OutputLocation, name: str, offset: int, nbytes: int, block: int, buf: memoryview, tensor: str
) -> str:
    """Hash `nbytes` at `offset` of `name` as the manifest does (the digest of each `block`), reading `buf`'s size
    (a whole number of blocks) at a time."""
    digests = []
    for start in range(0, max(nbytes, 1), len(buf)):
        view = buf[: min(len(buf), nbytes - start)]
        location.read_into(name, offset + start, view, tensor)
        digests += [xxhash.xxh3_128_digest(view[b : b + block]) for b in range(0, max(len(view), 1), block)]
    return tensor_hash(digests)


def _unsafe_shard(location: OutputLocation, shard: object) -> str | None:
    """Why a shard name read from the manifest must not be opened (a path out, a FIFO, a link), or None."""
    if not isinstance(shard, str) or not SHARD_NAME.match(shard):
        return "manifest names an unsafe shard path (only plain *.safetensors names inside the output)"
    try:
        location.size(shard)
    except NotPlain as e:
        return e.what
    except ChatvecError:
        pass  # missing: reported as an unreadable shard
    return None


def _index_problems(location: OutputLocation, table: pa.Table) -> list[str]:
    """The index must place every tensor where the manifest does (transformers loads through it)."""
    try:
        weight_map = location.json_object(INDEX_NAME, MAX_INDEX_BYTES).get("weight_map")
    except ChatvecError as e:
        return [str(e)]
    expected = dict(zip(table.column("tensor").to_pylist(), table.column("shard").to_pylist()))
    if weight_map == expected:
        return []
    return [f"{location.describe(INDEX_NAME)}: weight_map does not place the tensors as the manifest does"]
