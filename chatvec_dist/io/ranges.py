"""Exact byte ranges: `preadv` into caller-owned buffers, `pwrite` at planned offsets."""

from __future__ import annotations

import errno
import os
import resource
import stat
from collections import OrderedDict

from ..errors import ChatvecError


def open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor for `path`, which must be a regular file: a FIFO or device is refused, never waited on."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EMFILE:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            raise ChatvecError(
                f"cannot open: too many open files (this process may open {soft}: raise it with `ulimit -n`)",
                file=path,
            ) from None
        raise ChatvecError(f"cannot open: {e.strerror}", file=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ChatvecError("not a regular file (a FIFO, device or directory): not read", file=path)
    return fd


class FileHandles:
    """Open file descriptors for one worker, cached per path, at most `limit` at once (the least recently used is
    closed first: a checkpoint of 270 shards, read and written by many threads, stays under the process's limit)."""

    def __init__(self, limit: int | None = None) -> None:
        self._fds: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._written: set[str] = set()  # closed after writes: fsynced again by `sync`
        self.limit = limit or per_worker_limit()

    def get(self, path: str, flags: int = os.O_RDONLY) -> int:
        key = (path, flags)
        if key in self._fds:
            self._fds.move_to_end(key)
            return self._fds[key]
        while len(self._fds) >= self.limit:
            (old, old_flags), fd = self._fds.popitem(last=False)
            if old_flags & (os.O_WRONLY | os.O_RDWR):
                self._written.add(old)
            os.close(fd)
        self._fds[key] = open_regular(path, flags)
        return self._fds[key]

    def sync(self) -> None:
        """fsync every file written (on a shared filesystem: push it to the server)."""
        for path in sorted(self._written):
            self.get(path, os.O_WRONLY)
        for (path, flags), fd in list(self._fds.items()):
            if flags & (os.O_WRONLY | os.O_RDWR):
                try:
                    os.fsync(fd)
                except OSError as e:
                    raise ChatvecError(f"fsync failed: {e.strerror}", file=path) from None
        self._written.clear()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def per_worker_limit() -> int:
    """Descriptors one worker may keep open: a share of the process's soft limit (RLIMIT_NOFILE) that leaves room
    for four workers per core, Ray's own and Python's."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(4, min(256, soft // (4 * (os.cpu_count() or 1) + 8)))


def read_into(fd: int, buf: memoryview, offset: int, path: str, tensor: str) -> None:
    """Fill `buf` from `offset`; a short read means the file shrank after planning."""
    done = 0
    while done < len(buf):
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as e:
            raise ChatvecError(f"read failed: {e.strerror}", file=path, tensor=tensor) from None
        if n == 0:
            raise ChatvecError(
                f"file ends at byte {offset + done}, before this tensor's data (truncated?)", file=path, tensor=tensor
            )
        done += n


def write_at(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Write all of `buf` at `offset`."""
    done = 0
    while done < len(buf):
        try:
            done += os.pwrite(fd, buf[done:], offset + done)
        except OSError as e:
            raise ChatvecError(f"write failed: {e.strerror}", file=path) from None
