"""A Hugging Face Hub on 127.0.0.1 for tests: model repos served from local folders the way huggingface_hub reads
them, counting the bytes of each file it serves.

Served: the revision API (`/api/models/{repo}/revision/{rev}`: `sha` and `siblings`, with sizes, blob ids and LFS
sha256 when asked `?blobs=true`) and `/{repo}/resolve/{rev}/{file}` (HEAD and GET, byte ranges). As on the Hub, a
`resolve` answer carries `X-Repo-Commit` and an `ETag` (the git blob id); an LFS file (`*.safetensors`) is a 302 to
another origin (here a second port, as the Hub's CDN) with `X-Linked-Etag` (its sha256) and
`X-Linked-Size`. Errors carry the Hub's `X-Error-Code`: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo
(a 401 on every file of a gated repo; its API info stays public, as on the Hub)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

HOST = "127.0.0.1"
LFS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Blob:
    """One file of a repo: its bytes' path and identities."""

    path: Path
    size: int
    sha256: str
    git_sha1: str

    @property
    def lfs(self) -> bool:
        return self.path.name.endswith(LFS_SUFFIX)


@dataclass
class Repo:
    commit: str
    files: dict[str, Blob]
    gated: bool = False


@dataclass
class Served:
    """What the server sent: body bytes and whole-file GETs per (repo, file), and the revisions files were
    resolved at."""

    bytes: Counter = field(default_factory=Counter)
    downloads: Counter = field(default_factory=Counter)
    resolved_at: set = field(default_factory=set)
    token_to_cdn: int = 0  # requests to the CDN origin that carried an Authorization header
    lock: threading.Lock = field(default_factory=threading.Lock)


def blob(path: Path) -> Blob:
    data = path.read_bytes()
    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return Blob(path, len(data), hashlib.sha256(data).hexdigest(), git)


class FakeHub:
    """The server; use as a context manager. `add` a repo from a folder (top-level files only)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served = Served()
        self._servers = [
            ThreadingHTTPServer((HOST, 0), type("Handler", (Handler,), {"hub": self})) for _ in ("hub", "cdn")
        ]
        for server in self._servers:
            server.daemon_threads = True
        # the CDN: another origin (huggingface_hub must not send the token there), served by the same handler
        self.url, self.cdn = (f"http://{HOST}:{s.server_address[1]}" for s in self._servers)

    def add(self, repo_id: str, folder: Path, gated: bool = False) -> str:
        """Serve `folder` as `repo_id` at a commit named after it; returns the commit."""
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        files = {p.name: blob(p) for p in sorted(folder.iterdir()) if p.is_file()}
        self.repos[repo_id] = Repo(commit, files, gated)
        return commit

    def __enter__(self) -> FakeHub:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


class Handler(BaseHTTPRequestHandler):
    """The Hub's endpoints; `hub` is set on a subclass per server."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) >= 4 and parts[4:5] in ([], ["revision"]):
            self._info("/".join(parts[2:4]), "/".join(parts[5:]) or "main", parse_qs(url.query))
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        elif parts[0] == "cdn" and len(parts) >= 4:
            self._cdn("/".join(parts[1:3]), "/".join(parts[3:]), body)
        else:
            self._error(404, "RepoNotFound", "Not found")

    def _repo(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        else:
            return repo
        return None

    def _info(self, repo_id: str, revision: str, query: dict) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        blobs = query.get("blobs") == ["true"] or query.get("blobs") == ["True"]
        siblings = [_sibling(name, b, blobs) for name, b in repo.files.items()]
        doc = {"_id": repo_id, "id": repo_id, "sha": repo.commit, "private": False, "siblings": siblings}
        self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        with self.hub.served.lock:
            self.hub.served.resolved_at.add(revision)
        if repo.gated:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated.")
            return
        b = repo.files.get(name)
        if b is None:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.commit})
            return
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{b.git_sha1}"'}
        if b.lfs:
            headers |= {
                "Location": f"{self.hub.cdn}/cdn/{repo_id}/{name}",
                "X-Linked-Etag": f'"{b.sha256}"',
                "X-Linked-Size": str(b.size),
            }
            self._send(302, b"", headers)
        else:
            self._file(repo_id, name, b, headers, body)

    def _cdn(self, repo_id: str, name: str, body: bool) -> None:
        with self.hub.served.lock:
            self.hub.served.token_to_cdn += "Authorization" in self.headers
        b = self.hub.repos[repo_id].files[name]
        self._file(repo_id, name, b, {"ETag": f'"{b.sha256}"'}, body)

    def _file(self, repo_id: str, name: str, b: Blob, headers: dict[str, str], body: bool) -> None:
        """The file, or the byte range asked for (206)."""
        start, end, status = 0, b.size - 1, 200
        asked = self.headers.get("Range")
        if asked:
            first, _, last = asked.removeprefix("bytes=").partition("-")
            start, end, status = int(first), min(int(last) if last else b.size - 1, b.size - 1), 206
            headers = headers | {"Content-Range": f"bytes {start}-{end}/{b.size}"}
        with open(b.path, "rb") as f:
            f.seek(start)
            data = f.read(end + 1 - start)
        headers = headers | {"Accept-Ranges": "bytes", "Content-Length": str(len(data))}
        if body:
            with self.hub.served.lock:
                self.hub.served.bytes[(repo_id, name)] += len(data)
                self.hub.served.downloads[(repo_id, name)] += not asked
        self._send(status, data if body else b"", headers, len(data))

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        doc = json.dumps({"error": message}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._send(status, doc if self.command != "HEAD" else b"", headers | (extra or {}), len(doc))

    def _send(self, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key != "Content-Length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if data:
            self.wfile.write(data)


def _sibling(name: str, b: Blob, blobs: bool) -> dict:
    if not blobs:
        return {"rfilename": name}
    entry: dict = {"rfilename": name, "size": b.size, "blobId": b.git_sha1}
    if b.lfs:
        entry["lfs"] = {"size": b.size, "sha256": b.sha256, "pointerSize": 134}
    return entry
