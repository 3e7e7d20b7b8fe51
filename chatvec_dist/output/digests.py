"""File digests: `checksums.json` lists every file chatvec writes into an output (its size and sha256; for a
shard, the sha256 of its header bytes, padding included, since the manifest hashes its tensor data), so that
`verify` finds any changed, missing or added byte. It is written last before the rename and checks itself: its
bytes must be exactly what `encode_digests` makes of its own file list, self digest included."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import ChatvecError
from ..io.checkpoint import MAX_INDEX_BYTES
from ..io.header import MAX_HEADER_BYTES
from .location import LocalOutput, Missing, OutputLocation

DIGESTS_NAME = "checksums.json"
FORMAT = "chatvec file digests 1"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
PLAIN_NAME = re.compile(r"^[^/\x00]+$")  # a name inside the output, never a path out of it


def file_digests(directory: Path, headers: dict[str, int], skip: set[str]) -> dict[str, dict]:
    """Each file of `directory` but `skip` and the digests file: {"size", "sha256"}, or for a shard named in
    `headers` (its header length, 8-byte length field included) {"size", "header_bytes", "header_sha256"}."""
    entries = {}
    with LocalOutput(directory) as folder:
        for path in sorted(directory.iterdir()):
            if path.name in skip or path.name == DIGESTS_NAME:
                continue
            size = path.stat().st_size
            if path.name in headers:
                n = headers[path.name]
                entries[path.name] = {"size": size, "header_bytes": n, "header_sha256": _sha256(folder, path.name, n)}
            else:
                entries[path.name] = {"size": size, "sha256": _sha256(folder, path.name, size)}
    return entries


def encode_digests(files: dict[str, dict]) -> bytes:
    """The digests file's bytes: the file list and the sha256 of its canonical JSON (the self-check)."""
    body = {"format": FORMAT, "algorithm": "sha256", "files": files}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc = dict(body, self_sha256=hashlib.sha256(canonical).hexdigest())
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def read_digests(location: OutputLocation) -> dict[str, dict] | str | None:
    """The file list of the output's digests file; None if there is none; a problem line if it is damaged."""
    where = location.describe(DIGESTS_NAME)
    try:
        location.size(DIGESTS_NAME)
    except Missing:
        return None
    except ChatvecError:
        pass  # not a plain file: refused by the read below
    try:
        data = location.read_bytes(DIGESTS_NAME, MAX_INDEX_BYTES + 1)
        files = json.loads(data.decode("utf-8"))["files"]
    except (ChatvecError, OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"{where}: unreadable ({type(e).__name__}): no file could be checked against it"
    if not _well_formed(files) or encode_digests(files) != data:
        return f"{where}: does not match its own checksum (damaged or edited): no file could be checked against it"
    return files


def _well_formed(files: object) -> bool:
    """Plain names and the fields `check_file` reads, of the right types (a crafted file must not raise)."""
    return isinstance(files, dict) and all(_well_formed_entry(name, e) for name, e in files.items())


def _well_formed_entry(name: str, e: object) -> bool:
    if not (PLAIN_NAME.match(name) and name not in (".", "..") and isinstance(e, dict)):
        return False
    shard = "header_bytes" in e
    if set(e) != ({"size", "header_bytes", "header_sha256"} if shard else {"size", "sha256"}):
        return False
    digest = e["header_sha256" if shard else "sha256"]
    counts = [e["size"], e["header_bytes"]] if shard else [e["size"]]
    if not (isinstance(digest, str) and SHA256.match(digest)):
        return False
    return all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) and (
        not shard or e["header_bytes"] <= 8 + MAX_HEADER_BYTES
    )


def check_file(location: OutputLocation, name: str, entry: dict) -> str | None:
    """Why `name` differs from its entry (missing, not a plain file, another size or digest), or None."""
    where = location.describe(name)
    try:
        size = location.size(name)
    except Missing:
        return f"{where}: missing (listed in {DIGESTS_NAME})"
    except ChatvecError as e:
        return f"{where}: {e.what}"
    if size != entry["size"]:
        return f"{where}: size differs from {DIGESTS_NAME} ({size} bytes, {entry['size']} when written)"
    shard = "header_bytes" in entry
    try:
        digest = _sha256(location, name, entry["header_bytes"] if shard else entry["size"])
    except ChatvecError as e:
        return f"{where}: cannot be checked ({e.what})"
    if digest != entry["header_sha256" if shard else "sha256"]:
        what = "header bytes (JSON and padding) differ" if shard else "content differs"
        return f"{where}: {what} from {DIGESTS_NAME}"
    return None


def added_files(location: OutputLocation, files: dict[str, dict]) -> list[str]:
    """One line per entry of the output that chatvec did not write there (anything a loader might read)."""
    return [
        f"{location.describe(name)}: not written by chatvec (added after the commit; not in {DIGESTS_NAME})"
        for name in sorted(location.names())
        if name not in files and name != DIGESTS_NAME
    ]


def _sha256(location: OutputLocation, name: str, nbytes: int) -> str:
    """The sha256 of the first `nbytes` of `name`, streamed (a local file is never read through a link: a FIFO
    would block the read)."""
    h = hashlib.sha256()
    chunk = min(location.chunk, max(nbytes, 1))
    buf = memoryview(bytearray(chunk))
    try:
        for start in range(0, nbytes, chunk):
            n = min(chunk, nbytes - start)
            location.read_into(name, start, buf[:n])
            h.update(buf[:n])
    finally:
        location.release(name)
    return h.hexdigest()
