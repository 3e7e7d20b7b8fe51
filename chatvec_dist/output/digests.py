"""File digests: `checksums.json` lists every file chatvec writes into an output (its size and sha256; for a
shard, the sha256 of its header bytes, padding included, since the manifest hashes its tensor data), so that
`verify` finds any changed, missing or added byte. It is written last before the rename and checks itself: its
bytes must be exactly what `encode_digests` makes of its own file list, self digest included."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

from ..errors import ChatvecError
from ..io.checkpoint import MAX_INDEX_BYTES
from ..io.header import MAX_HEADER_BYTES
from ..io.ranges import open_regular, read_into

DIGESTS_NAME = "checksums.json"
FORMAT = "chatvec file digests 1"
CHUNK = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")
PLAIN_NAME = re.compile(r"^[^/\x00]+$")  # a name inside the output, never a path out of it


def file_digests(directory: Path, headers: dict[str, int], skip: set[str]) -> dict[str, dict]:
    """Each file of `directory` but `skip` and the digests file: {"size", "sha256"}, or for a shard named in
    `headers` (its header length, 8-byte length field included) {"size", "header_bytes", "header_sha256"}."""
    entries = {}
    for path in sorted(directory.iterdir()):
        if path.name in skip or path.name == DIGESTS_NAME:
            continue
        size = path.stat().st_size
        if path.name in headers:
            n = headers[path.name]
            entries[path.name] = {"size": size, "header_bytes": n, "header_sha256": _sha256(str(path), n)}
        else:
            entries[path.name] = {"size": size, "sha256": _sha256(str(path), size)}
    return entries


def encode_digests(files: dict[str, dict]) -> bytes:
    """The digests file's bytes: the file list and the sha256 of its canonical JSON (the self-check)."""
    body = {"format": FORMAT, "algorithm": "sha256", "files": files}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc = dict(body, self_sha256=hashlib.sha256(canonical).hexdigest())
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def read_digests(out_dir: Path) -> dict[str, dict] | str | None:
    """The file list of `out_dir`'s digests file; None if there is none; a problem line if it is damaged."""
    path = out_dir / DIGESTS_NAME
    if not os.path.lexists(path):
        return None
    try:
        fd = open_regular(str(path), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
        files = json.loads(data.decode("utf-8"))["files"]
    except (ChatvecError, OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"{path}: unreadable ({type(e).__name__}): no file could be checked against it"
    if not _well_formed(files) or encode_digests(files) != data:
        return f"{path}: does not match its own checksum (damaged or edited): no file could be checked against it"
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


def check_file(out_dir: Path, name: str, entry: dict) -> str | None:
    """Why `name` differs from its entry (missing, not a plain file, another size or digest), or None."""
    path = out_dir / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path}: missing (listed in {DIGESTS_NAME})"
    except OSError as e:
        return f"{path}: cannot be checked ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file (a link, FIFO or directory): not opened"
    if st.st_size != entry["size"]:
        return f"{path}: size differs from {DIGESTS_NAME} ({st.st_size} bytes, {entry['size']} when written)"
    shard = "header_bytes" in entry
    try:
        digest = _sha256(str(path), entry["header_bytes"] if shard else entry["size"])
    except ChatvecError as e:
        return f"{path}: cannot be checked ({e.what})"
    if digest != entry["header_sha256" if shard else "sha256"]:
        what = "header bytes (JSON and padding) differ" if shard else "content differs"
        return f"{path}: {what} from {DIGESTS_NAME}"
    return None


def added_files(out_dir: Path, files: dict[str, dict]) -> list[str]:
    """One line per entry of `out_dir` that chatvec did not write there (anything a loader might read)."""
    return [
        f"{out_dir / name}: not written by chatvec (added after the commit; not in {DIGESTS_NAME})"
        for name in sorted(os.listdir(out_dir))
        if name not in files and name != DIGESTS_NAME
    ]


def _sha256(path: str, nbytes: int) -> str:
    """The sha256 of the first `nbytes` of `path` (a regular file, never a link: a FIFO would block the read)."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(min(CHUNK, max(nbytes, 1))))
    fd = open_regular(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        for start in range(0, nbytes, CHUNK):
            n = min(CHUNK, nbytes - start)
            read_into(fd, buf[:n], start, path, "")
            h.update(buf[:n])
    finally:
        os.close(fd)
    return h.hexdigest()
