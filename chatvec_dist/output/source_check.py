"""`chatvec verify --sources`: re-read every source tensor an output's manifest records, rehash it as the workers
did (see exec/source_digests.py) and compare; a source file that is gone or changed since is named too."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import xxhash

from ..dtypes import ITEMSIZE
from ..errors import ChatvecError
from ..io import s3
from ..io.ranges import open_regular, read_into
from ..planning.fp8 import SCALE_SUFFIX
from .location import LOCAL_CHUNK, S3_CHUNK
from .manifest import tensor_hash
from .workarea import changed_field

COLUMN = "source_digests"


@dataclass
class _Source:
    """One source tensor as the manifest records it, and the roles it played (`cp`, `base[0]`, …)."""

    row: int  # the first manifest row that reads it: where its lines go
    tensor: str
    offset: int
    nbytes: int
    dtype: str
    hash: str
    segments: tuple[tuple[str, int, int], ...] = ()  # (file, offset, bytes) read end to end: mapped MoE experts
    roles: list[str] = field(default_factory=list)


class _File:
    """A local source file, opened once (links followed: a Hub cache links its blobs), read with preadv."""

    chunk = LOCAL_CHUNK

    def __init__(self, path: str, recorded: list | None) -> None:
        self.path, self.fd = path, open_regular(path)
        st = os.fstat(self.fd)
        # its identity now; a Hub file's is fixed by its blob and commit: only its size can be compared here
        hub = recorded is not None and len(recorded) == 3 and isinstance(recorded[1], str)
        self.identity = [st.st_size, *(recorded or [])[1:]] if hub else [st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def read(self, offset: int, buf: memoryview, tensor: str) -> None:
        read_into(self.fd, buf, offset, self.path, tensor)

    def close(self) -> None:
        os.close(self.fd)


class _Object:
    """An s3:// source: its size, ETag and version now (a HEAD); every read pinned to that ETag."""

    chunk = S3_CHUNK

    def __init__(self, url: str) -> None:
        self.url, self.identity = url, s3.identity(url)

    def read(self, offset: int, buf: memoryview, tensor: str) -> None:
        s3.read_into(self.url, offset, buf, tensor, self.identity[1])

    def close(self) -> None:
        pass


def source_problems(table: pa.Table, meta: dict, manifest: str, pool: ThreadPoolExecutor) -> list[str]:
    """One line per source tensor whose bytes differ from the digest the manifest records (naming the file and
    the tensor), per source file gone or changed since the output was written; files read in parallel, the lines
    in the manifest's row order."""
    block_elems = (meta.get("source_hash") or {}).get("block_elems") if isinstance(meta, dict) else None
    if COLUMN not in table.column_names:
        return [f"{manifest}: written before chatvec recorded source digests: its sources cannot be checked"]
    if not (isinstance(block_elems, int) and block_elems > 0):
        return [f"{manifest}: manifest metadata has no valid source hash scheme: its sources cannot be checked"]
    files, problems = _by_file(table, manifest)
    inputs = meta["inputs"] if isinstance(meta.get("inputs"), dict) else {}
    found = pool.map(lambda p: _check_file(p, files[p], inputs.get(p), block_elems, manifest), files)
    lines = sorted(itertools.chain(problems, *found), key=lambda line: line[0])
    return [line for _, line in lines]


def _by_file(table: pa.Table, manifest: str) -> tuple[dict[str, list[_Source]], list[tuple[tuple[int, int], str]]]:
    """The recorded source tensors by file (each once, however many roles it played); a malformed entry: a line."""
    files: dict[str, dict[tuple, _Source]] = {}
    problems = []
    for row, (tensor, entries) in enumerate(zip(table.column("tensor").to_pylist(), table.column(COLUMN).to_pylist())):
        for e in entries or ():
            if not _well_formed(e):
                problems.append(((row, 0), f"{manifest}: tensor '{tensor}' has a malformed source digest: not checked"))
                continue
            segments = tuple((g["file"], g["offset"], g["nbytes"]) for g in e.get("segments") or ())
            key = (e["offset"], e["nbytes"], e["dtype"], e["hash"], segments)
            name = tensor + SCALE_SUFFIX if e["role"].endswith(".scale") else tensor  # the scales' own tensor
            source = files.setdefault(e["file"], {}).setdefault(key, _Source(row, name, *key))
            source.roles.append(e["role"])
    return {path: list(sources.values()) for path, sources in files.items()}, problems


def _well_formed(e: object) -> bool:
    if not isinstance(e, dict):  # a null entry
        return False
    segments = e.get("segments") or []
    counts = [
        e["offset"],
        e["nbytes"],
        *(n for g in segments if isinstance(g, dict) for n in (g["offset"], g["nbytes"])),
    ]
    return (
        all(isinstance(e[k], str) for k in ("role", "file", "hash"))
        and e["dtype"] in ITEMSIZE
        and all(isinstance(n, int) and n >= 0 for n in counts)
        and all(isinstance(g, dict) and isinstance(g["file"], str) for g in segments)
        and (not segments or sum(g["nbytes"] for g in segments) == e["nbytes"])
    )


def _check_file(
    path: str, sources: list[_Source], recorded: object, block_elems: int, manifest: str
) -> list[tuple[tuple[int, int], str]]:
    """(sort key, line) for one source file: gone, changed since, and each of its tensors whose bytes differ."""
    first = (sources[0].row, 0)
    then = recorded if isinstance(recorded, list) else None
    try:
        source: _File | _Object = _Object(path) if s3.is_url(path) else _File(path, then)
    except ChatvecError as e:
        return [(first, f"{path}: gone or unreadable ({e.what}): its {len(sources)} source tensor(s) not checked")]
    reader = _Reader(path, source)
    try:
        differ = [
            ((s.row, 1), line) for s in sources if (line := _check_tensor(reader, path, s, block_elems, manifest))
        ]
    finally:
        reader.close()
    if then is None or source.identity == then:
        return differ
    what = changed_field(path, then, source.identity)
    changed = f"{path}: changed since the output was written ({what}); {len(differ)} of its {len(sources)} source "
    return [(first, changed + "tensor(s) differ"), *differ]


class _Reader:
    """A source tensor's bytes from its file, or from its segments' files (each opened once, on first use)."""

    def __init__(self, path: str, source: _File | _Object) -> None:
        self.opened, self.chunk = {path: source}, source.chunk

    def read(self, s: _Source, at: int, buf: memoryview) -> None:
        """Bytes [at, at + len(buf)) of the tensor as the merge read it."""
        if not s.segments:
            self.opened[next(iter(self.opened))].read(s.offset + at, buf, s.tensor)
            return
        done, start = 0, 0
        for path, offset, nbytes in s.segments:
            lo, hi = max(at, start), min(at + len(buf), start + nbytes)
            if lo < hi:
                if path not in self.opened:
                    self.opened[path] = _Object(path) if s3.is_url(path) else _File(path, None)
                self.opened[path].read(offset + lo - start, buf[done : done + hi - lo], s.tensor)
                done += hi - lo
            start += nbytes

    def close(self) -> None:
        for source in self.opened.values():
            source.close()


def _check_tensor(source: _Reader, path: str, s: _Source, block_elems: int, manifest: str) -> str | None:
    """Why one source tensor's bytes no longer match their recorded digest, or None."""
    block = block_elems * ITEMSIZE[s.dtype]
    window = max(1, source.chunk // block) * block
    buf = memoryview(bytearray(max(block, min(window, -(-s.nbytes // block) * block))))
    digests = []
    try:
        for start in range(0, max(s.nbytes, 1), len(buf)):
            view = buf[: min(len(buf), s.nbytes - start)]
            source.read(s, start, view)
            digests += [xxhash.xxh3_128_digest(view[b : b + block]) for b in range(0, max(len(view), 1), block)]
    except ChatvecError as e:
        return f"{path}: tensor '{s.tensor}' ({', '.join(s.roles)}) cannot be read ({e.what})"
    if tensor_hash(digests) == s.hash:
        return None
    return f"{path}: tensor '{s.tensor}' ({', '.join(s.roles)}) differs from its digest in {manifest}"
