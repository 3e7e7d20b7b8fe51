"""Exact byte ranges: `preadv` into caller-owned buffers, `pwrite` at planned offsets."""

from __future__ import annotations

import os
import stat

from ..errors import ChatvecError


def open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor for `path`, which must be a regular file: a FIFO or device is refused, never waited on."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ChatvecError(f"cannot open: {e.strerror}", file=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ChatvecError("not a regular file (a FIFO, device or directory): not read", file=path)
    return fd


class FileHandles:
    """Open file descriptors, cached per path, for one worker."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str, int], int] = {}

    def get(self, path: str, flags: int = os.O_RDONLY) -> int:
        key = (path, flags)
        if key not in self._fds:
            self._fds[key] = open_regular(path, flags)
        return self._fds[key]

    def sync(self) -> None:
        """fsync every file opened for writing (on a shared filesystem: push it to the server)."""
        for (path, flags), fd in self._fds.items():
            if flags & (os.O_WRONLY | os.O_RDWR):
                try:
                    os.fsync(fd)
                except OSError as e:
                    raise ChatvecError(f"fsync failed: {e.strerror}", file=path) from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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
