"""A Hub repo (`org/name[@revision]`) opened without downloading its weights.

The revision is resolved to a commit by one API call (which also lists the files, their sizes and sha256), and
every later read is of that commit: the index and the side files (config, tokenizer, ...) are downloaded whole
into the Hugging Face cache, each shard's header is read over two HTTP ranges (or from the cache where it holds
the shard). Each tensor's path is where the cache holds, or will hold, its shard: the workers fetch a shard there
on first use (`sources.local_copy`), so planning never waits for tensor data."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChatvecError, HeaderError, SourceError
from .checkpoint import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    MAX_SIDE_BYTES,
    Checkpoint,
    collect_tensors,
    header_from_ranges,
    is_side_file,
    parse_weight_map,
    pick_weights,
)
from .header import TensorInfo, read_header, shown

CONSOLIDATED = "consolidated*.safetensors"  # Mistral's copy of the shards: read only where nothing else is
HEADER_READERS = 8  # shards whose headers are read at once
HTTP_TIMEOUT_S = 60.0  # per request to the Hub (its session has none)
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubFile:
    """One file of the repo at the pinned commit."""

    size: int | None
    blob: str | None  # the LFS sha256, else the git blob id: the name of its blob in the HF cache


@dataclass(frozen=True)
class HubRepo:
    """A repo pinned at one commit: its files (top level and below) and its snapshot folder in this cache."""

    repo_id: str
    commit: str
    files: dict[str, HubFile]
    snapshot: Path

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.commit)

    def download(self, name: str, limit: int, error: type[ChatvecError] = SourceError) -> Path:
        """A small file, whole, into the cache (at once if the cache holds it); refused past `limit` bytes."""
        from huggingface_hub import hf_hub_download

        size = self.files[name].size
        if size is not None and size > limit:
            raise error(f"{shown(name)} is larger than {limit} bytes", file=self.repo_id)
        return Path(hf_hub_download(self.repo_id, name, revision=self.commit))

    def record(self, name: str) -> dict[str, object]:
        """What the manifest says of a file: its cache blob (sha256 for an LFS file) and its size."""
        f = self.files[name]
        kind = "sha256" if f.blob and SHA256.match(f.blob) else "blob"
        return {kind: f.blob, "size": f.size}


def open_hub_checkpoint(repo_id: str, revision: str) -> Checkpoint:
    """Open `repo_id` at `revision` (a branch, tag or commit; "" for main) from the Hub, reading headers only."""
    with hub_errors(repo_id):
        repo = _resolve(repo_id, revision or "main")
        weights, names = _weight_files(repo)
        side = sorted(n for n in repo.files if "/" not in n and is_side_file(n))
        for name in side:
            repo.download(name, MAX_SIDE_BYTES)
        repo.snapshot.mkdir(parents=True, exist_ok=True)  # a repo with no side file at all: still a folder to read
        _check_links(repo)
        headers = _headers(repo, weights)
    index = str(repo.snapshot / INDEX_NAME)
    tensors = collect_tensors([(n, str(repo.snapshot / n)) for n in weights], headers.__getitem__, names, index)
    used = [*weights, *side, *([INDEX_NAME] if names is not None else [])]
    source: dict[str, object] = {
        "repo": repo_id,
        "revision": revision or "main",
        "commit": repo.commit,
        "files": {n: repo.record(n) for n in sorted(used)},
    }
    ckpt = Checkpoint(repo.snapshot, tensors, source)
    ckpt.config  # noqa: B018 -- refuse a config.json that is not a JSON object now, not after the merge
    _save_ref(repo, revision or "main")
    return ckpt


def _resolve(repo_id: str, revision: str) -> HubRepo:
    """The commit `revision` points to now, and that commit's files (one API call)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=HTTP_TIMEOUT_S)
    if not info.sha:
        raise SourceError("the Hub did not say which commit the revision is at", file=repo_id)
    files = {
        s.rfilename: HubFile(s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else s.blob_id)
        for s in info.siblings or ()
    }
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    return HubRepo(repo_id, info.sha, files, storage / "snapshots" / info.sha)


def _weight_files(repo: HubRepo) -> tuple[list[str], dict[str, str] | None]:
    """The shards to read, as for a local folder (top level only; consolidated*.safetensors only if alone), and
    the index's weight map (None without an index)."""
    top = [n for n in repo.files if "/" not in n]
    if any(n.endswith(".safetensors") and not fnmatch.fnmatch(n, CONSOLIDATED) for n in top):
        top = [n for n in top if not fnmatch.fnmatch(n, CONSOLIDATED)]
    files = pick_weights(sorted(top), repo.repo_id)
    if files is not None:
        return files, None
    index = repo.download(INDEX_NAME, MAX_INDEX_BYTES, HeaderError)
    names = parse_weight_map(index.read_bytes(), str(index))
    for tname, fname in names.items():
        if fname not in repo.files:
            raise HeaderError(f"weight_map names a missing shard {shown(fname)}", file=str(index), tensor=tname)
    return sorted(set(names.values())), names


def _check_links(repo: HubRepo) -> None:
    """Every file the snapshot folder holds resolves inside the repo's cache folder, as for a snapshot read from
    the cache (workers read a cached shard where it is; the commit copies the side files)."""
    root = repo.snapshot.parent.parent.resolve()
    for entry in sorted(repo.snapshot.iterdir()):
        real = entry.resolve()
        if not real.is_relative_to(root):
            raise HeaderError(f"{entry.name} resolves to {real}, outside the checkpoint {root}", file=str(entry))


def _headers(repo: HubRepo, weights: list[str]) -> dict[str, dict[str, TensorInfo]]:
    """Each shard's header by its planned path, several shards at once."""
    with ThreadPoolExecutor(HEADER_READERS) as pool:
        found = list(pool.map(lambda name: _header(repo, name), weights))
    return {str(repo.snapshot / name): header for name, header in zip(weights, found)}


def _header(repo: HubRepo, name: str) -> dict[str, TensorInfo]:
    """A shard's header: from the cache if it holds the shard, else from two ranged GETs of the pinned commit."""
    from huggingface_hub import get_hf_file_metadata, try_to_load_from_cache

    cached = try_to_load_from_cache(repo.repo_id, name, revision=repo.commit)
    if isinstance(cached, str):
        return read_header(cached)[0]
    url = repo.url(name)
    size = repo.files[name].size
    if size is None:  # not in the listing's metadata: a HEAD says
        size = get_hf_file_metadata(url).size
    if size is None:
        raise SourceError("the Hub gives no size for this file", file=url)
    return header_from_ranges(lambda offset, length: read_range(url, offset, length, size), size, url)


def read_range(url: str, offset: int, length: int, size: int) -> bytes:
    """`length` bytes at `offset` of a Hub file (redirects followed, the token sent to the Hub only), checked to
    be a 206 answer for a file of `size` bytes; never more than asked for is read."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    headers = build_hf_headers() | {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
    data = bytearray()
    with get_session().stream("GET", url, headers=headers, timeout=HTTP_TIMEOUT_S) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if response.status_code != 206:
            raise SourceError(f"the Hub answered {response.status_code} to a byte-range request", file=url)
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if total != str(size):
            raise SourceError(f"the Hub gives its size as {total or 'unknown'}, its file list as {size}", file=url)
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= length:
                break
    if len(data) != length:
        raise SourceError(f"the Hub answered {len(data)} bytes to a request for {length}", file=url)
    return bytes(data)


def _save_ref(repo: HubRepo, revision: str) -> None:
    """Record which commit `revision` is, as huggingface_hub does (`refs/<revision>`), so that an offline run
    resolves the same id from the cache once it holds the shards."""
    if revision == repo.commit:
        return
    ref = repo.snapshot.parent.parent / "refs" / revision
    with contextlib.suppress(OSError):  # a read-only cache: only the offline look-up is lost
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(repo.commit)


@contextlib.contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """huggingface_hub's and the network's errors as one-line SourceErrors naming the repo."""
    try:
        yield
    except ChatvecError:
        raise
    except Exception as e:
        raise SourceError(hub_error_text(e), file=repo_id) from None


def hub_error_text(e: Exception) -> str:
    """What went wrong, in one line, with what to do about it."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return "a gated repo: ask for access on its Hub page, then log in (`hf auth login`, or set HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repo on the Hub (or a private one: log in with `hf auth login`, or set HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError):
        return "no such revision (branch, tag or commit) on the Hub"
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return f"the Hub answered {e.response.status_code} ({_one_line(e)})"
    cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ else e
    what = f"{type(cause).__name__}: {_one_line(cause)}"
    return f"cannot reach the Hub (offline?): {what}" if isinstance(cause, (httpx2.TransportError, OSError)) else what


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
