"""s3:// objects through boto3: URLs, a per-process client, HEAD, listing, ranged reads into caller buffers.

Credentials and the endpoint come only from the standard AWS chain (environment, profile, instance role), resolved
by each process itself: no secret is ever passed around, and none appears in an error."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import SourceError

SCHEME = "s3://"
BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,254}$")  # S3's rules, loosened for S3-compatible stores
PART_BYTES = 8 * 1024 * 1024  # a large range is read as concurrent ranged GETs of this size ...
PARTS_IN_FLIGHT = 4  # ... at most this many at once per call
CHUNK_BYTES = 1024 * 1024  # what one readinto asks of a body (urllib3 copies through a chunk this big)
BODY_TRIES = 3  # a body that ends early is asked for again from where it stopped
NEEDS_BOTO3 = "s3:// needs boto3: pip install 'chatvec-dist[s3]'"
# The environment a client is made from: a change (a test, a refreshed token) makes a new one.
AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
# What an S3 error code means, said without anything the server echoed back.
CODES = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such object",
    "404": "no such object (or bucket)",
    "NotFound": "no such object (or bucket)",
    "AccessDenied": "access denied (check the credentials and the bucket's policy)",
    "403": "access denied (check the credentials and the bucket's policy)",
    "Forbidden": "access denied (check the credentials and the bucket's policy)",
    "InvalidAccessKeyId": "access denied: the endpoint does not know this access key",
    "SignatureDoesNotMatch": "access denied: the secret key does not match the access key",
    "ExpiredToken": "the session token has expired: renew the credentials",
    "TokenRefreshRequired": "the session token has expired: renew the credentials",
    "InvalidToken": "the session token is not valid: renew the credentials",
    "InvalidRange": "the object is shorter than planned (truncated or replaced since?)",
    "416": "the object is shorter than planned (truncated or replaced since?)",
    "PreconditionFailed": "the object changed while being read (its ETag differs): run again",
    "412": "the object changed while being read (its ETag differs): run again",
    "SlowDown": "the store kept throttling requests (SlowDown) after every retry: try again later, or fewer workers",
    "503": "the store kept answering 503 (unavailable or throttling) after every retry",
    "NoSuchUpload": "no such multipart upload (aborted, or completed already): run again with --restart",
    "EntityTooSmall": "a part of the upload is below the store's minimum size (5 MiB but the last)",
    "InvalidPart": "a part of the upload is missing or its ETag differs (uploaded again since?): run again",
    "InvalidPartOrder": "the upload's parts were not listed in number order",
}


class MissingObject(SourceError):
    """The bucket or the object does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    """What identifies one object's bytes: a replaced object has a new ETag (and version, where versioned)."""

    size: int
    etag: str
    version: str | None = None


class Traffic:
    """Bytes and requests this process fetched from S3 (what a plan costs, seen by tests and benchmarks)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int, requests: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.requests += requests


traffic = Traffic()
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def is_url(path: str) -> bool:
    return path.startswith(SCHEME)


def parse(url: str, *, key_required: bool = True) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; a malformed URL is a one-line error (never echoing `user:secret@`)."""
    bucket, _, key = url[len(SCHEME) :].partition("/") if is_url(url) else ("", "", "")
    if not BUCKET.match(bucket) or "\x00" in key or (key_required and not key):
        shown = SCHEME + "…@" + url.rpartition("@")[2] if "@" in bucket else url
        what = "an object key" if bucket and BUCKET.match(bucket) else "a bucket name (3-255 letters, digits, . _ -)"
        raise SourceError(f"malformed S3 URL: s3://BUCKET/KEY needs {what}", file=shown)
    return bucket, key


def join(prefix_url: str, name: str) -> str:
    return prefix_url.rstrip("/") + "/" + name


def client(patient: bool = True) -> Any:
    """This process's S3 client. `patient` (workers): adaptive retries, enough for a store that throttles with
    503 SlowDown; else (planning) a few quick retries, so that a wrong endpoint fails in seconds."""
    key = (os.getpid(), patient, tuple(os.environ.get(v) for v in AWS_ENV))
    with _clients_lock:
        if key not in _clients:
            _clients[key] = _make_client(patient)
        return _clients[key]


def _make_client(patient: bool) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise SourceError(NEEDS_BOTO3) from None
    config = Config(
        retries={"mode": "adaptive", "max_attempts": 10} if patient else {"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=64,
        tcp_keepalive=True,
    )
    try:
        return boto3.session.Session().client("s3", config=config)
    except Exception as e:  # a bad profile, region or endpoint in the environment
        raise SourceError(f"cannot make an S3 client: {type(e).__name__}: {e}") from None


def head(url: str) -> ObjectInfo:
    """Size, ETag and version id of one object (the driver's look-up: quick retries)."""
    bucket, key = parse(url)
    try:
        r = client(False).head_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise failure(e, url) from None
    traffic.add(0, 1)
    return ObjectInfo(int(r["ContentLength"]), str(r.get("ETag", "")), r.get("VersionId"))


def identity(url: str) -> list[Any]:
    """[size, ETag, version id]: what says an object is still the one a partial output was made from (a JSON list,
    as a local file's [size, mtime, ctime])."""
    info = head(url)
    return [info.size, info.etag, info.version]


def folder(prefix_url: str) -> tuple[str, str]:
    """(bucket, key prefix) of a prefix URL read as a folder: the prefix ends in `/` ('' for a whole bucket)."""
    bucket, key = parse(prefix_url, key_required=False)
    return bucket, key.rstrip("/") + "/" if key.strip("/") else ""


def list_folder(prefix_url: str) -> tuple[dict[str, ObjectInfo], list[str]]:
    """The objects directly under `prefix_url` by name, and the "folders" (`name/`) holding objects further down."""
    bucket, prefix = folder(prefix_url)
    objects, folders = {}, []
    try:
        pages = client(False).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            traffic.add(0, 1)
            for obj in page.get("Contents", ()):
                if name := obj["Key"][len(prefix) :]:
                    objects[name] = ObjectInfo(int(obj["Size"]), str(obj.get("ETag", "")))
            folders += [p["Prefix"][len(prefix) :] for p in page.get("CommonPrefixes", ())]
    except Exception as e:
        raise failure(e, prefix_url) from None
    return objects, folders


def list_names(prefix_url: str) -> dict[str, ObjectInfo]:
    """The objects directly under `prefix_url` (as if a folder: not those further down), by name."""
    return list_folder(prefix_url)[0]


def read_bytes(url: str, limit: int) -> tuple[bytes, ObjectInfo]:
    """A whole (small) object and its identity, refused if larger than `limit`; the GET is pinned to the HEAD's
    ETag (an object replaced between the two is an error, not a mix)."""
    info = head(url)
    if info.size > limit:
        raise SourceError(f"larger than {limit} bytes", file=url)
    return read_range(url, 0, info.size, info.etag), info


def read_range(url: str, offset: int, length: int, etag: str | None = None) -> bytes:
    """`length` bytes from `offset` (fewer where the object ends first); with `etag`, of that object only."""
    buf = bytearray(length)
    n = _get_part(parse(url), url, offset, memoryview(buf), etag, False, short_ok=True)
    return bytes(buf[:n])


def read_into(url: str, offset: int, buf: memoryview, tensor: str | None = None, etag: str | None = None) -> None:
    """Fill `buf` from `offset` with ranged GETs streamed into it (no copy of the whole range); a large range as
    several concurrent GETs of PART_BYTES. With `etag`, of that object only (one replaced since is an error)."""
    where = parse(url)
    view = memoryview(buf).cast("B")
    parts = [(i, min(i + PART_BYTES, len(view))) for i in range(0, len(view), PART_BYTES)]
    try:
        if len(parts) <= 1:
            _get_part(where, url, offset, view, etag, True)
            return
        with ThreadPoolExecutor(min(PARTS_IN_FLIGHT, len(parts)), thread_name_prefix="s3-read") as pool:
            for done in [pool.submit(_get_part, where, url, offset + a, view[a:b], etag, True) for a, b in parts]:
                done.result()
    except SourceError as e:
        raise type(e)(e.what, file=url, tensor=tensor) from None


def _get_part(
    where: tuple[str, str],
    url: str,
    offset: int,
    view: memoryview,
    etag: str | None,
    patient: bool,
    short_ok: bool = False,
) -> int:
    """Ranged GETs into `view`: a body that ends early is asked for again from where it stopped. Returns the bytes
    read: all of `view`, unless `short_ok` and the object ends first (else an error)."""
    done, broken = 0, 0
    while done < len(view):
        body, wanted = _get(where, url, offset + done, offset + len(view) - 1, etag, patient)
        got = 0 if body is None else _fill(body, view[done : done + wanted])
        done += got
        traffic.add(got)
        if body is not None and got < wanted:  # the connection dropped mid-body
            broken += 1
            if broken >= BODY_TRIES:
                raise SourceError(f"the body kept ending early ({BODY_TRIES} tries) at byte {offset + done}", file=url)
        elif done < len(view):  # the store sent all it has: the object ends first
            if short_ok:
                return done
            raise SourceError(
                f"the object ends at byte {offset + done}, before the range planned (truncated or replaced since?)",
                file=url,
            )
    return done


def _get(where: tuple[str, str], url: str, first: int, last: int, etag: str | None, patient: bool) -> tuple[Any, int]:
    """The body of one ranged GET and its length; (None, 0) where the range starts past the object's end."""
    bucket, key = where
    try:
        r = client(patient).get_object(
            Bucket=bucket, Key=key, Range=f"bytes={first}-{last}", **({"IfMatch": etag} if etag else {})
        )
    except Exception as e:
        if error_code(e) in ("InvalidRange", "416"):
            return None, 0
        raise failure(e, url) from None
    traffic.add(0, 1)
    if not str(r.get("ContentRange", "")).startswith(f"bytes {first}-"):  # a 200 with the whole object
        r["Body"].close()
        raise SourceError("the store ignored the byte range of a ranged GET (it must support Range)", file=url)
    return r["Body"], int(r["ContentLength"])


def _fill(body: Any, view: memoryview) -> int:
    """Stream `body` into `view`, chunk by chunk; the bytes it held (fewer if it ended early)."""
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    done = 0
    readinto = getattr(body, "readinto", None)  # botocore ≥ 1.38; before it, read() and a chunk-sized copy
    try:
        while done < len(view):
            chunk = view[done : done + CHUNK_BYTES]
            if readinto is not None:
                n = readinto(chunk)
            else:
                data = body.read(len(chunk))
                n = len(data)
                chunk[:n] = data
            if n == 0:
                break
            done += n
    except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError):
        pass  # ended early: the caller asks again for the rest
    finally:
        body.close()
    return done


def error_code(e: Exception) -> str:
    """The S3 error code of a botocore error (`NoSuchKey`, `404`, …); empty for any other error."""
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def failure(e: Exception, url: str) -> SourceError:
    """A botocore error as a one-line SourceError naming the URL, said in words: never a credential, never the
    server's own message (which may echo the request)."""
    if isinstance(e, SourceError):  # already said (no boto3, no usable client): as it is
        return e
    error = MissingObject if error_code(e) in ("NoSuchBucket", "NoSuchKey", "404", "NotFound") else SourceError
    return error(_described(e), file=url)


def _described(e: Exception) -> str:
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(e, ClientError):
        code = error_code(e)
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return CODES.get(code) or f"S3 error {code or 'without a code'} (HTTP {status})"
    if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
        return f"cannot connect to the S3 endpoint {_endpoint()} (check AWS_ENDPOINT_URL, the network)"
    if isinstance(e, ReadTimeoutError):
        return f"the S3 endpoint {_endpoint()} stopped answering (read timed out after every retry)"
    if isinstance(e, NoCredentialsError):
        return "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
    return f"S3 request failed ({type(e).__name__})"


def _endpoint() -> str:
    try:
        return str(client(False).meta.endpoint_url)
    except SourceError:
        return "(none)"
