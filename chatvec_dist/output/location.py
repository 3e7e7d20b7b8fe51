"""Where a committed output is: a local folder or an `s3://bucket/prefix`, read through one small interface so
that `verify` and `inspect` work the same on both. An S3 output is its folder's files as objects under the prefix;
every read of one is a ranged GET pinned to the ETag the listing gave (an object replaced meanwhile is an error,
never a mix of two versions)."""

from __future__ import annotations

import json
import os
import stat
import threading
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Protocol, Union

import pyarrow as pa

from ..errors import ChatvecError, HeaderError, VerifyError
from ..io import s3
from ..io.checkpoint import read_json_object
from ..io.header import MAX_HEADER_BYTES, TensorInfo, parse_header_bytes, read_header
from ..io.ranges import open_regular, read_into

NOT_PLAIN = "not a regular file (a link, FIFO or directory): not opened"
LOCAL_CHUNK = 1 << 20  # bytes one local read asks for (more gains nothing from the page cache)
S3_CHUNK = s3.PART_BYTES * s3.PARTS_IN_FLIGHT  # one read: this many concurrent ranged GETs
MAX_MANIFEST_BYTES = 1 << 30  # one row per tensor: tens of MB for the largest models


class Missing(ChatvecError):
    """No such file or object in the output."""


class NotPlain(ChatvecError):
    """A link, FIFO or folder where a file should be: never opened (a FIFO would block the read)."""


class OutputLocation(Protocol):
    """A committed output's files, by name: what `verify` and `inspect` read."""

    where: str  # the folder or URL as given
    absent: str  # what to say when there is nothing there
    chunk: int  # bytes one read should ask for

    def exists(self) -> bool: ...
    def describe(self, name: str) -> str: ...
    def names(self) -> dict[str, int]: ...
    def size(self, name: str) -> int: ...
    def read_into(self, name: str, offset: int, buf: memoryview, tensor: str | None = None) -> None: ...
    def read_bytes(self, name: str, limit: int) -> bytes: ...
    def header(self, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]: ...
    def json_object(self, name: str, limit: int) -> dict: ...
    def parquet(self, name: str) -> str | pa.NativeFile: ...
    def is_file(self, name: str) -> bool: ...
    def release(self, name: str) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> OutputLocation: ...
    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None: ...


Where = Union[str, "os.PathLike[str]", OutputLocation]


def open_output(location: Where) -> OutputLocation:
    """An output location from a folder path or an `s3://` URL (a location is returned as it is)."""
    if not isinstance(location, (str, os.PathLike)):
        return location
    if isinstance(location, str) and s3.is_url(location):
        return S3Output(location)
    return LocalOutput(location)


class _Closing:
    """A location as a context manager: closed (its open files) on leaving."""

    def release(self, name: str) -> None:
        """Done reading `name` for now (a local file is closed: an output may have more files than descriptors)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class LocalOutput(_Closing):
    """A local output folder: files opened once each (never through a link), read with preadv."""

    absent = "no such folder"
    chunk = LOCAL_CHUNK

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.where = str(folder)
        self.folder = Path(folder)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return os.path.lexists(self.folder)

    def describe(self, name: str) -> str:
        return str(self.folder / name)

    def names(self) -> dict[str, int]:
        """Every entry of the folder (links, FIFOs, folders too), with its lstat size."""
        found = {}
        for name in os.listdir(self.folder):
            try:
                found[name] = os.lstat(self.folder / name).st_size
            except OSError:
                found[name] = 0  # gone since the listing: still named
        return found

    def size(self, name: str) -> int:
        path = self.describe(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise Missing("missing", file=path) from None
        except OSError as e:
            raise ChatvecError(f"cannot be checked ({e.strerror})", file=path) from None
        if not stat.S_ISREG(st.st_mode):
            raise NotPlain(NOT_PLAIN, file=path)
        return st.st_size

    def read_into(self, name: str, offset: int, buf: memoryview, tensor: str | None = None) -> None:
        read_into(self._fd(name), buf, offset, self.describe(name), tensor or "")

    def read_bytes(self, name: str, limit: int) -> bytes:
        fd = open_regular(self.describe(name), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            return f.read(limit)

    def header(self, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        return read_header(self.describe(name))

    def json_object(self, name: str, limit: int) -> dict:
        return read_json_object(self.folder / name, VerifyError, limit)

    def parquet(self, name: str) -> str:
        return self.describe(name)

    def is_file(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def _fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                self._fds[name] = open_regular(self.describe(name), os.O_RDONLY | os.O_NOFOLLOW)
            return self._fds[name]

    def release(self, name: str) -> None:
        with self._lock:
            fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class S3Output(_Closing):
    """An output under an `s3://bucket/prefix`: listed once; objects read with ranged GETs pinned to their ETags."""

    absent = "no objects under this prefix (no such output)"
    chunk = S3_CHUNK

    def __init__(self, url: str) -> None:
        s3.parse(url, key_required=False)  # a malformed URL: a one-line error now
        self.where = url
        self.url = url.rstrip("/")

    @cached_property
    def _listing(self) -> tuple[dict[str, s3.ObjectInfo], list[str]]:
        return s3.list_folder(self.url)

    def exists(self) -> bool:
        objects, folders = self._listing
        return bool(objects or folders)

    def describe(self, name: str) -> str:
        return s3.join(self.url, name)

    def names(self) -> dict[str, int]:
        """Every object directly under the prefix, and each deeper "folder" as `name/` (size 0)."""
        objects, folders = self._listing
        return {name: info.size for name, info in objects.items()} | dict.fromkeys(folders, 0)

    def size(self, name: str) -> int:
        return self._info(name).size

    def read_into(self, name: str, offset: int, buf: memoryview, tensor: str | None = None) -> None:
        s3.read_into(self.describe(name), offset, buf, tensor, self._info(name).etag)

    def read_bytes(self, name: str, limit: int) -> bytes:
        info = self._info(name)
        return s3.read_range(self.describe(name), 0, min(info.size, limit), info.etag)

    def header(self, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """A shard's header from two ranged GETs (the length, then the JSON), through the local files' parser."""
        url = self.describe(name)
        try:
            info = self._info(name)
        except Missing as e:
            raise HeaderError(e.what, file=url) from None
        head = s3.read_range(url, 0, min(8, info.size), info.etag) if info.size else b""
        if len(head) == 8:
            n = int.from_bytes(head, "little")
            if n <= MAX_HEADER_BYTES and 8 + n <= info.size:
                head += s3.read_range(url, 8, n, info.etag)
        return parse_header_bytes(head, info.size, url)

    def json_object(self, name: str, limit: int) -> dict:
        """As a local folder's `read_json_object`: {} when absent; too large, not JSON or not an object: an error."""
        url = self.describe(name)
        if name not in self._listing[0]:
            return {}
        if self.size(name) > limit:
            raise VerifyError(f"larger than {limit} bytes", file=url)
        try:
            value = json.loads(self.read_bytes(name, limit).decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise VerifyError(f"not readable JSON ({type(e).__name__})", file=url) from None
        if not isinstance(value, dict):
            raise VerifyError("not a JSON object", file=url)
        return value

    def parquet(self, name: str) -> pa.NativeFile:
        return pa.BufferReader(self.read_bytes(name, MAX_MANIFEST_BYTES))

    def is_file(self, name: str) -> bool:
        return name in self._listing[0]

    def _info(self, name: str) -> s3.ObjectInfo:
        info = self._listing[0].get(name)
        if info is None:
            raise Missing("no such object (not listed under the prefix)", file=self.describe(name))
        return info
