"""The I/O floor on the user's storage: every node reads its share of the inputs once and writes an output-sized
share, with the calls and the concurrency chatvec's workers use (pread / ranged GETs, pwrite / multipart parts)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..io import s3, s3_sink
from ..io.ranges import open_regular, read_into, write_at
from ..recipe.spec import MiB

CHUNK = 64 * MiB  # bytes per read and per part, as a default unit


@dataclass(frozen=True)
class NodeFloor:
    """What one node moved, and how long its reads and its writes took."""

    node: str
    bytes_read: int
    read_s: float
    bytes_written: int
    write_s: float

    @property
    def seconds(self) -> float:
        return self.read_s + self.write_s


def shares(files: list[tuple[str, int]], nodes: int) -> list[list[tuple[str, int, int]]]:
    """The inputs' bytes cut into `nodes` shares that differ by at most a byte, as (file, offset, length) reads of
    at most CHUNK each."""
    total = sum(size for _, size in files)
    out: list[list[tuple[str, int, int]]] = []
    for k in range(nodes):
        first, last = total * k // nodes, total * (k + 1) // nodes
        reads, at = [], 0  # `at`: the current file's offset in the concatenation
        for path, size in files:
            lo, hi = max(first, at), min(last, at + size)
            reads += [(path, o - at, min(CHUNK, hi - o)) for o in range(lo, hi, CHUNK)]
            at += size
        out.append(reads)
    return out


def floor_on_node(node: str, reads: list[tuple[str, int, int]], out: str, out_bytes: int, streams: int) -> NodeFloor:
    """On `node` (its label): read `reads`, then write `out_bytes` to `out` (a file, fsynced, or an s3:// multipart upload), each with
    `streams` threads; `out` is removed afterwards."""
    t0 = time.perf_counter()
    _read_all(reads, streams)
    t1 = time.perf_counter()
    (_put if s3.is_url(out) else _write)(out, out_bytes, streams)
    t2 = time.perf_counter()
    (s3_sink.delete if s3.is_url(out) else os.unlink)(out)
    return NodeFloor(node, sum(n for *_, n in reads), t1 - t0, out_bytes, t2 - t1)


def _read_all(reads: list[tuple[str, int, int]], streams: int) -> None:
    """Every read once, `streams` in flight, each thread into its own reused buffer."""
    local = threading.local()
    fds = {path: open_regular(path) for path, _, _ in reads if not s3.is_url(path)}  # pread: shared by threads

    def read(job: tuple[str, int, int]) -> None:
        path, offset, length = job
        if not hasattr(local, "buf"):
            local.buf = bytearray(CHUNK)
        view = memoryview(local.buf)[:length]
        if s3.is_url(path):
            s3.read_into(path, offset, view)
        else:
            read_into(fds[path], view, offset, path, "")

    try:
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(read, reads))
    finally:
        for fd in fds.values():
            os.close(fd)


def _write(path: str, nbytes: int, streams: int) -> None:
    """`nbytes` into a new file, `streams` pwrites in flight, then fsync (as a commit does)."""
    data = memoryview(bytes(range(256)) * (CHUNK // 256))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(lambda at: write_at(fd, data[: min(CHUNK, nbytes - at)], at, path), range(0, nbytes, CHUNK)))
        os.fsync(fd)
    finally:
        os.close(fd)


def _put(url: str, nbytes: int, streams: int) -> None:
    """One multipart upload of `nbytes`, parts of CHUNK, `streams` at once, completed."""
    data = memoryview(bytes(range(256)) * (CHUNK // 256))
    upload = s3_sink.create_upload(url)
    parts = [(k + 1, min(CHUNK, nbytes - at)) for k, at in enumerate(range(0, max(nbytes, 1), CHUNK))]
    with ThreadPoolExecutor(streams) as pool:
        done = dict(pool.map(lambda p: (p[0], s3_sink.upload_part(url, upload, p[0], data[: p[1]])), parts))
    s3_sink.complete(url, upload, done, nbytes)
