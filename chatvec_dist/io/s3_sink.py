"""Writing an output to s3://: one multipart upload per shard, parts from any worker, completed by the driver.

Every call names the object's URL in its errors (never a credential); a failure is a RunError (exit 3): the
parts uploaded so far stay journaled, and the same command resumes.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from ..errors import ChatvecError, RunError, SourceError
from . import s3

GONE = ("NoSuchUpload", "404", "NotFound")  # an upload completed or aborted already


def create_upload(url: str) -> str:
    """Start a multipart upload at `url`; its upload id. A create that was retried may have made uploads whose
    answer was lost: every other upload open at `url` is aborted then (a run makes one only where it has none)."""
    bucket, key = s3.parse(url)
    try:
        r = s3.client(True).create_multipart_upload(Bucket=bucket, Key=key)
    except Exception as e:
        raise _run_error(e, url) from None
    s3.traffic.add(0, 1)
    upload_id = str(r["UploadId"])
    if r.get("ResponseMetadata", {}).get("RetryAttempts"):
        for other in open_uploads(url.rpartition("/")[0]).get(url, ()):
            if other != upload_id:
                abort(url, other)
    return upload_id


def upload_part(url: str, upload_id: str, number: int, data: memoryview) -> str:
    """Upload part `number` (an upload of the same number again replaces it); its ETag."""
    bucket, key = s3.parse(url)
    try:
        r = s3.client(True).upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=_Reader(data)
        )
    except Exception as e:
        raise _run_error(e, url) from None
    s3.traffic.add(len(data), 1)
    return str(r["ETag"])


def upload_part_copy(url: str, upload_id: str, number: int, source: str, offset: int, size: int, etag: str) -> str:
    """Part `number` made by the store from bytes [offset, offset + size) of the object `source` (UploadPartCopy:
    no byte through this process), only while that object's ETag is `etag` (the one whose bytes were read and
    hashed: an object replaced since is refused, naming it); the part's ETag."""
    bucket, key = s3.parse(url)
    from_bucket, from_key = s3.parse(source)
    try:
        r = s3.client(True).upload_part_copy(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            CopySource={"Bucket": from_bucket, "Key": from_key},
            CopySourceRange=f"bytes={offset}-{offset + size - 1}",
            CopySourceIfMatch=etag,
        )
    except Exception as e:
        if s3.error_code(e) in ("PreconditionFailed", "412", "NoSuchKey", "InvalidRange", "416"):
            raise s3.failure(e, source) from None  # the source, as a read of it says it
        raise _run_error(e, url) from None
    s3.traffic.add(0, 1)
    etag = str(r["CopyPartResult"]["ETag"])
    return etag if etag.startswith('"') else f'"{etag}"'  # quoted, as ListParts shows it (SeaweedFS answers bare)


def listed_parts(url: str, upload_id: str) -> dict[int, set[tuple[str, int]]] | None:
    """The parts an upload holds, {number: {(ETag, size)}}; None if the upload is gone (completed or aborted).
    S3 lists the last upload of each number; SeaweedFS lists every upload of a number and completes the one whose
    ETag it is given: either way, a part listed with the ETag a worker reported is the one completion assembles."""
    bucket, key = s3.parse(url)
    found: dict[int, set[tuple[str, int]]] = {}
    try:
        pages = s3.client(True).get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id)
        for page in pages:
            s3.traffic.add(0, 1)
            for part in page.get("Parts", ()):
                found.setdefault(int(part["PartNumber"]), set()).add((str(part["ETag"]), int(part["Size"])))
    except Exception as e:
        if s3.error_code(e) in GONE:
            return None
        raise _run_error(e, url) from None
    return found


def complete(url: str, upload_id: str, parts: dict[int, str], size: int) -> str:
    """Assemble the object of `size` bytes from its parts ({number: ETag}), in number order; the object's ETag.
    An upload gone (NoSuchUpload) is taken as completed if the object there is the one these parts assemble: a
    completion retried after its answer was lost, or completed by a commit interrupted before its index."""
    bucket, key = s3.parse(url)
    listed = [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]
    try:
        r = s3.client(True).complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed}
        )
    except Exception as e:
        if s3.error_code(e) != "NoSuchUpload":
            raise _run_error(e, url) from None
        found = assembled(url, parts, size)
        if found is None:
            raise RunError(
                "the multipart upload is gone (NoSuchUpload) and the object there is not the one its parts "
                "assemble (its ETag or size differs): run again with --restart",
                file=url,
            ) from None
        return found
    s3.traffic.add(0, 1)
    return str(r.get("ETag", ""))


def assembled(url: str, parts: dict[int, str], size: int) -> str | None:
    """The ETag of the object at `url` if it is the one `parts` ({number: ETag}) assemble: its size is `size`
    and its ETag the multipart ETag of those parts; else None (no object, or another one)."""
    try:
        info = s3.head(url)
    except s3.MissingObject:
        return None
    except SourceError as e:
        raise RunError(e.what, file=url) from None
    expected = multipart_etag(parts)
    return info.etag if info.size == size and expected is not None and info.etag.strip('"') == expected else None


def multipart_etag(parts: dict[int, str]) -> str | None:
    """The ETag a store gives the object completed from `parts` ({number: ETag}): the MD5 of the parts' binary
    digests, then `-N` (S3 without SSE-KMS, where a part's ETag is its MD5; SeaweedFS the same, counting a copied
    part's `digest-n` ETag by its digest). None if a part's ETag is not such a digest (SSE-KMS, another store)."""
    try:
        digests = b"".join(bytes.fromhex(parts[n].strip('"').partition("-")[0]) for n in sorted(parts))
    except ValueError:
        return None
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"


def abort(url: str, upload_id: str) -> None:
    """Drop an upload and its parts (a store bills open uploads until they are aborted); gone already is fine."""
    bucket, key = s3.parse(url)
    try:
        s3.client(True).abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as e:
        if s3.error_code(e) not in GONE:
            raise _run_error(e, url) from None
    s3.traffic.add(0, 1)


def put(url: str, data: bytes) -> None:
    """One whole (small) object: a side file, the manifest, the index."""
    bucket, key = s3.parse(url)
    try:
        s3.client(True).put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as e:
        raise _run_error(e, url) from None
    s3.traffic.add(len(data), 1)


def delete(url: str) -> None:
    """Remove an object (gone already is fine: S3 answers a DELETE of nothing with success)."""
    bucket, key = s3.parse(url)
    try:
        s3.client(True).delete_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise _run_error(e, url) from None
    s3.traffic.add(0, 1)


def open_uploads(prefix_url: str) -> dict[str, list[str]]:
    """Multipart uploads still open directly under `prefix_url` (as if a folder): {object URL: [upload ids]}."""
    bucket, prefix = s3.folder(prefix_url)
    found: dict[str, list[str]] = {}
    try:
        pages = s3.client(True).get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            s3.traffic.add(0, 1)
            for upload in page.get("Uploads", ()):
                if "/" not in upload["Key"][len(prefix) :]:  # not those of a folder further down
                    found.setdefault(f"{s3.SCHEME}{bucket}/{upload['Key']}", []).append(str(upload["UploadId"]))
    except Exception as e:
        raise _run_error(e, prefix_url) from None
    return found


def abort_all(prefix_url: str) -> int:
    """Abort every upload open directly under `prefix_url` (left by a run on another machine); how many."""
    count = 0
    for url, ids in open_uploads(prefix_url).items():
        for upload_id in ids:
            abort(url, upload_id)
            count += 1
    return count


class _Reader(io.RawIOBase):
    """A part's bytes as the file botocore wants (it takes no memoryview), read and re-read (a retry) in place:
    no copy of the part."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.at = memoryview(data).cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), len(self.data) - self.at)
        buf[:n] = self.data[self.at : self.at + n]
        self.at += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.at = max(0, offset + (0, self.at, len(self.data))[whence])
        return self.at

    def tell(self) -> int:
        return self.at


def _run_error(e: Exception, url: str) -> ChatvecError:
    """A failed write: said as s3.failure says a failed read, as a failed run."""
    said = s3.failure(e, url)
    return RunError(said.what, file=said.file)
