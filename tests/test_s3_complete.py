"""A CompleteMultipartUpload retried after the store acted on it, on a real S3 server (SeaweedFS on 127.0.0.1,
behind a proxy that answers such a retry with NoSuchUpload as a store that forgets completed uploads does):
accepted where the object there is the one the parts assemble (size and multipart ETag), refused in one line
naming the object where it is not."""

from __future__ import annotations

import hashlib
import itertools
import os

import pytest
from s3server import ForgetfulProxy

from chatvec_dist.errors import RunError
from chatvec_dist.io import s3, s3_sink

BUCKET = "completes"
MiB = 2**20
_names = itertools.count()


@pytest.fixture
def store(s3_server, monkeypatch):
    """The bucket, and a proxy in front of the store that every client of this process goes through."""
    try:
        s3.client(True).create_bucket(Bucket=BUCKET)
    except Exception as e:  # made by an earlier test
        assert s3.error_code(e) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"), e
    proxy = ForgetfulProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # a new client: every request through the proxy
    yield proxy
    proxy.close()


def uploaded(parts: list[bytes]) -> tuple[str, str, dict[int, str]]:
    """A fresh object's multipart upload holding `parts`: its URL, upload id and {number: ETag}."""
    url = f"s3://{BUCKET}/obj{next(_names)}-{os.getpid()}"
    upload = s3_sink.create_upload(url)
    return url, upload, {n: s3_sink.upload_part(url, upload, n, memoryview(p)) for n, p in enumerate(parts, 1)}


def read(url: str) -> bytes:
    bucket, key = s3.parse(url)
    return s3.client(True).get_object(Bucket=bucket, Key=key)["Body"].read()


PARTS = [b"a" * (5 * MiB), bytes(range(256)) * (5 * MiB // 256), b"tail"]


def test_a_completion_answered_no_such_upload_is_accepted_when_the_object_is_the_one_its_parts_assemble(store):
    url, upload, parts = uploaded(PARTS)
    size = sum(map(len, PARTS))
    etag = s3_sink.complete(url, upload, parts, size)
    assert s3_sink.complete(url, upload, parts, size) == etag  # the retry: NoSuchUpload, then HEAD
    assert store.forgotten == 1
    assert read(url) == b"".join(PARTS)
    # S3's rule, computed here: the MD5 of the parts' binary MD5s, then -N; the store's own ETag is that
    md5s = b"".join(hashlib.md5(p).digest() for p in PARTS)
    assert etag.strip('"') == f"{hashlib.md5(md5s).hexdigest()}-3"


@pytest.mark.parametrize("other", ["same size", "shorter"])
def test_a_completion_answered_no_such_upload_is_refused_when_another_object_is_there(store, other):
    url, upload, parts = uploaded(PARTS)
    size = sum(map(len, PARTS))
    s3_sink.complete(url, upload, parts, size)
    s3_sink.put(url, b"b" * size if other == "same size" else b"".join(PARTS)[:-1])  # replaced since
    with pytest.raises(RunError) as e:
        s3_sink.complete(url, upload, parts, size)
    assert e.value.file == url and "NoSuchUpload" in e.value.what and "\n" not in str(e.value)
    assert store.forgotten == 1


def test_a_completion_answered_no_such_upload_with_no_object_there_is_refused(store):
    url, upload, parts = uploaded(PARTS)
    s3_sink.abort(url, upload)
    store.completed.add(upload.encode())  # the store forgot it: NoSuchUpload, and nothing was ever completed
    with pytest.raises(RunError, match="NoSuchUpload"):
        s3_sink.complete(url, upload, parts, sum(map(len, PARTS)))
