"""Input reads that bypass the page cache: O_DIRECT into aligned windows, handed out as views (no copy).

A byte read once gains nothing from the page cache: a buffered read costs the kernel a page-cache page (allocated,
filled, later reclaimed) and a copy into the caller's buffer, CPU that a 2-core worker is short of. Here the disk
DMAs a planned range's aligned interior straight into a page-aligned window; the few bytes before the first and
after the last aligned block (< 4 KiB each) are read with ordinary `preadv` into the same window, so no byte outside
the planned range is ever asked for. A caller gets a view into the window: valid until its slot's next read.

Bytes already in the page cache (a model just downloaded or merged) are cheaper to copy than to read again from
disk: before each refill `cachestat(2)` (Linux ≥ 6.5) counts the window's cached pages, and a window mostly cached is
read buffered. Where cachestat is missing (an older kernel, a seccomp filter) every read is buffered, as before.
A file that refuses O_DIRECT (tmpfs, some network filesystems: EINVAL at open or at the first read) is read with
ordinary `preadv` into the same windows, per file.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys

from ..errors import ChatvecError
from .ranges import FileHandles, read_into

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and addresses (a page: every block size below it divides it)
WINDOW = 16 << 20  # bytes read per refill: a few strips of a piece, one syscall
MIN_DIRECT = 256 << 10  # a smaller aligned interior is read buffered (its neighbours then come from read-ahead)


SYS_CACHESTAT = 451  # the same number on every Linux architecture (the generic syscall table)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def cached_pages(fd: int, offset: int, nbytes: int) -> int | None:
    """Pages of [offset, offset + nbytes) of `fd` in the page cache, or None where cachestat(2) is unavailable."""
    if _libc is None:
        return None
    stat = _Stat()
    if _libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(_Range(offset, nbytes)), ctypes.byref(stat), 0) != 0:
        return None
    return int(stat.cache)


def _down(n: int) -> int:
    return n - n % ALIGN


def _up(n: int) -> int:
    return _down(n + ALIGN - 1)


class Window:
    """One slot's page-aligned buffer and the file bytes [start, end) of `path` it holds, at buffer offset
    `start % ALIGN` (so that file offsets and addresses agree modulo ALIGN)."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, WINDOW + 2 * ALIGN)
        self.path = ""
        self.start = self.end = 0

    def reserve(self, nbytes: int) -> None:
        """Room for `nbytes` from any offset (a whole-piece strip may be larger than a window)."""
        if len(self.buf) < nbytes + 2 * ALIGN:
            self.buf = mmap.mmap(-1, nbytes + 2 * ALIGN)  # the old one lives while views of it do

    def view(self, path: str, offset: int, nbytes: int) -> memoryview | None:
        """The bytes [offset, offset + nbytes) of `path` if this window holds them."""
        if path != self.path or offset < self.start or offset + nbytes > self.end:
            return None
        at = offset - _down(self.start)
        return memoryview(self.buf)[at : at + nbytes]


class DirectReader:
    """A worker's direct reads: a window per slot, descriptors from the worker's FileHandles (one limit for all)."""

    def __init__(self, files: FileHandles) -> None:
        self.files = files
        self._windows: dict[object, Window] = {}
        self.refused: set[str] = set()  # files that refused O_DIRECT: read buffered
        self.direct_bytes = 0  # read past the page cache so far

    def read(self, slot: object, path: str, offset: int, nbytes: int, limit: int, tensor: str) -> memoryview:
        """A view of bytes [offset, offset + nbytes) of `path`, valid until `slot` is read again. The window is
        refilled from `offset` to at most `limit`, the end of the range the caller planned to read."""
        window = self._windows.get(slot) or self._windows.setdefault(slot, Window())
        found = window.view(path, offset, nbytes)
        if found is None:
            end = max(offset + nbytes, min(limit, offset + WINDOW))
            window.reserve(end - offset)
            self._fill(window, path, offset, end, tensor)
            found = window.view(path, offset, nbytes)
            assert found is not None
        return found

    def _fill(self, window: Window, path: str, start: int, end: int, tensor: str) -> None:
        """Window := bytes [start, end) of `path`: the aligned interior direct, head and tail buffered."""
        window.path, window.start, window.end = "", 0, 0  # invalid until filled
        base = _down(start)
        inner_lo, inner_hi = _up(start), _down(end)
        view = memoryview(window.buf)
        if inner_hi - inner_lo >= MIN_DIRECT and self._direct(path, view, inner_lo, inner_hi, base):
            for lo, hi in ((start, inner_lo), (inner_hi, end)):
                if hi > lo:
                    read_into(self.files.get(path), view[lo - base : hi - base], lo, path, tensor)
        else:
            read_into(self.files.get(path), view[start - base : end - base], start, path, tensor)
        window.path, window.start, window.end = path, start, end

    def _direct(self, path: str, view: memoryview, lo: int, hi: int, base: int) -> bool:
        """Read the aligned [lo, hi) with O_DIRECT into `view` at `lo - base`; False where the file refuses it."""
        if path in self.refused:
            return False
        try:
            fd = self.files.get(path, os.O_RDONLY | os.O_DIRECT)
        except ChatvecError:  # EINVAL from a filesystem without O_DIRECT; a real error recurs on the buffered open
            self.refused.add(path)
            return False
        cached = cached_pages(fd, lo, hi - lo)
        if cached is None or cached * mmap.PAGESIZE * 2 >= hi - lo:  # unknown, or mostly cached: a copy is cheaper
            return False
        done = 0
        while done < hi - lo:
            try:
                n = os.preadv(fd, [view[lo - base + done : hi - base]], lo + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise ChatvecError(f"read failed: {e.strerror}", file=path) from None
                self.refused.add(path)
                return False
            if n == 0:  # the file shrank: the buffered read says so, naming the tensor
                return False
            done += n
        self.direct_bytes += done
        return True
