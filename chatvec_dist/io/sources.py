"""Sources: a local directory, an `s3://bucket/prefix` folder, or a Hub repo id (`org/name[@revision]`) resolved
offline-first: a snapshot the HF cache holds whole is read there; else the repo is opened on the Hub from its
headers (io/hub_checkpoint.py), and each worker fetches the shards it reads into its own node's cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ChatvecError, SourceError
from ..log import logger
from . import s3
from .checkpoint import SIDE_PATTERNS, Checkpoint, open_checkpoint, read_json_object
from .hub_checkpoint import CONSOLIDATED, hub_error_text, open_hub_checkpoint
from .s3_checkpoint import open_s3_checkpoint

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
ALLOW_PATTERNS = ["*.safetensors", *SIDE_PATTERNS]
TOP_LEVEL_ONLY = ["*/*"]  # checkpoint-500/, onnx/, gptq-4bit/...: never read (the patterns' * matches "/" too)
IGNORE_PATTERNS = [CONSOLIDATED, *TOP_LEVEL_ONLY]  # Mistral's copy of the shards: only if alone
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MODULE_REF = re.compile(r"^([A-Za-z_]\w*)\.\w+$")  # auto_map's "modeling_x.ClassName" (this repo's code)


def open_source(spec: str) -> Checkpoint:
    """Open `spec`: an `s3://` URL, an existing local directory, else a Hub repo id: from the HF cache where it
    holds the whole snapshot, else from the Hub's headers (the cache may hold part of it, e.g. just `config.json`,
    left by `AutoConfig`: what it holds is read there). With HF_HUB_OFFLINE set, from the cache only."""
    if s3.is_url(spec):
        return open_s3_checkpoint(spec)
    if os.path.exists(spec) or not REPO_ID.match(spec):
        return open_checkpoint(spec)
    if os.path.isdir(folder := spec.split("/", 1)[0]):  # `models/llama-zh` mistyped: not a Hub id to try
        raise SourceError(
            f"no such directory; {folder}/ exists here, so this is not read as a Hub id (check the name)", file=spec
        )
    repo_id, _, revision = spec.partition("@")
    unusable = None
    cached = _snapshot(repo_id, revision or None, local_files_only=True)
    if cached is not None:
        try:
            ckpt = _open_snapshot(cached, repo_id, revision)
        except ChatvecError as e:
            unusable = e
        else:
            return _top_up(ckpt, repo_id, revision) if missing_remote_code(ckpt.directory) else ckpt
    if not _offline():
        return open_hub_checkpoint(repo_id, revision)
    fetched = _fetch(repo_id, revision or None, unusable)
    try:
        return _open_snapshot(fetched, repo_id, revision)
    except ChatvecError as e:
        if unusable is None:
            raise
        raise SourceError(
            f"the cached snapshot is unusable and fetching did not mend it (offline, or a damaged file "
            f"that the cache still holds: delete it there to have it downloaded again): {e}",
            file=repo_id,
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _top_up(cached: Checkpoint, repo_id: str, revision: str) -> Checkpoint:
    """A cached snapshot lacking the code its auto_map names (cached by a tool that skipped *.py): fetch it, or
    go on without it, saying so (the weights are complete; the output will lack the code too)."""
    try:  # the cached commit's missing files, not whatever the branch points to now
        commit = str(cached.source["commit"])
        ckpt = _open_snapshot(_fetch(repo_id, commit), repo_id, revision)
        why = "the Hub has no such files (or is offline)"
    except ChatvecError as e:
        ckpt, why = cached, f"fetching failed: {e.what}"
    if missing := missing_remote_code(ckpt.directory):
        logger.warning(
            f"{repo_id}: the snapshot lacks {', '.join(missing)}, named by its auto_map ({why}); "
            "the output will lack them too"
        )
    return ckpt


def missing_remote_code(directory: Path) -> list[str]:
    """The module files of this repo that config.json's or tokenizer_config.json's auto_map names and
    `directory` lacks (references into another repo, `org/name--module.Class`, are not this repo's)."""
    wanted = set()
    for name in ("config.json", "tokenizer_config.json"):
        auto_map = read_json_object(directory / name).get("auto_map")
        for ref in auto_map.values() if isinstance(auto_map, dict) else ():
            for one in ref if isinstance(ref, list) else [ref]:
                if isinstance(one, str) and (module := MODULE_REF.match(one)):
                    wanted.add(module[1] + ".py")
    return sorted(f for f in wanted if not (directory / f).is_file())


def _open_snapshot(snapshot: Path, repo_id: str, revision: str) -> Checkpoint:
    repo_root = snapshot.parent.parent  # models--org--name: snapshot symlinks point into its blobs/
    files = {}
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            blob, size = path.resolve().name, path.stat().st_size
            files[str(path.relative_to(snapshot))] = {"sha256" if SHA256.match(blob) else "blob": blob, "size": size}
    source = {"repo": repo_id, "revision": revision or "main", "commit": snapshot.name, "files": files}
    return open_checkpoint(snapshot, root=repo_root, source=source)


def _fetch(repo_id: str, revision: str | None, unusable: ChatvecError | None = None) -> Path:
    """The snapshot folder, downloading what the cache lacks."""
    snapshot = _snapshot(repo_id, revision, local_files_only=False, unusable=unusable)
    assert snapshot is not None  # None only from a cache-only look-up
    return snapshot


def _snapshot(
    repo_id: str, revision: str | None, *, local_files_only: bool, unusable: ChatvecError | None = None
) -> Path | None:
    """The snapshot folder: from the cache only (None if not there), or downloading what it lacks."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
                local_files_only=local_files_only,
            )
        )
        if local_files_only or any(snapshot.glob("*.safetensors")):
            return snapshot
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, ignore_patterns=TOP_LEVEL_ONLY)
        )  # consolidated only
    except LocalEntryNotFoundError as e:
        if local_files_only:
            return None
        error = f"cannot reach the Hub (offline?): {' '.join(str(e).split())}"
    except Exception as e:  # huggingface_hub raises several types for a bad cache entry or a failed download
        error = f"{type(e).__name__}: {' '.join(str(e).split())}"
    if local_files_only:
        raise SourceError(f"cannot resolve from the local Hugging Face cache: {error}", file=repo_id)
    cached = (
        "no such local directory, not in the local Hugging Face cache"
        if unusable is None
        else f"the cached snapshot is unusable ({unusable})"
    )
    raise SourceError(f"{cached} and not downloadable: {error}", file=repo_id)


def hub_files(checkpoints: list[Checkpoint]) -> dict[str, tuple[str, str, str]]:
    """For Hub checkpoints: each file's path in this machine's cache → (repo, commit, file name)."""
    found = {}
    for ckpt in checkpoints:
        if "repo" in ckpt.source:
            repo, commit, files = str(ckpt.source["repo"]), str(ckpt.source["commit"]), ckpt.source["files"]
            assert isinstance(files, dict)
            for name in files:
                found[str(ckpt.directory / name)] = (repo, commit, name)
    return found


def hub_identities(checkpoints: list[Checkpoint]) -> dict[str, list]:
    """For Hub checkpoints: each file's path → [size, blob, commit], its identity as an input of a job. The commit
    fixes the bytes, whether or not this machine's cache holds the file yet (workers fetch it on first use)."""
    found = {}
    for ckpt in checkpoints:
        if "repo" in ckpt.source:
            commit, files = str(ckpt.source["commit"]), ckpt.source["files"]
            assert isinstance(files, dict)
            for name, f in files.items():
                found[str(ckpt.directory / name)] = [f.get("size"), f.get("sha256") or f.get("blob"), commit]
    return found


def local_copy(path: str, hub: dict[str, tuple[str, str, str]]) -> str:
    """`path` if this node has it; else the same Hub file (pinned commit) fetched into this node's own cache."""
    if os.path.exists(path) or path not in hub:
        return path
    from huggingface_hub import hf_hub_download

    repo, commit, name = hub[path]
    try:
        return hf_hub_download(repo, name, revision=commit)
    except Exception as e:
        raise SourceError(
            f"cannot fetch {name}@{commit} into this node's cache: {hub_error_text(e)}", file=repo
        ) from None
