"""A checkpoint "folder" in S3 (`s3://bucket/prefix`), opened from its listing, index and shard headers only.

No tensor data is downloaded here: each tensor's path is its shard's full `s3://` URL, read later by the workers
with ranged GETs. The side files (config, tokenizer, ...) are downloaded into a local temporary folder, the
checkpoint's `directory`, kept as long as the checkpoint is (and removed at exit at the latest). Each folder holds a
lock while its process lives: a folder left by a process that was killed (kill -9, the OOM killer) is removed by the
next checkpoint opened from S3."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from ..errors import HeaderError, SourceError
from . import s3
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
from .header import TensorInfo, shown

EXTRA_FILES = ("manifest.parquet",)  # a chatvec output's manifest: `apply --vector` checks what it holds
SIDE_PREFIX, LOCK_NAME = "chatvec-s3-", ".chatvec-lock"


def open_s3_checkpoint(url: str) -> Checkpoint:
    """Open `s3://bucket/prefix` as a checkpoint folder: listing, index, headers (ranged GETs), side files."""
    url = url.rstrip("/")
    s3.parse(url, key_required=False)
    listing = s3.list_names(url)
    if not listing:
        raise SourceError("no objects under this prefix (no such checkpoint folder)", file=url)
    files = pick_weights(sorted(listing), url)
    names = None
    if files is None:
        names = _weight_map(url, listing)
        files = sorted(set(names.values()))
    objects = {name: _info(url, name, listing) for name in files}
    shards = [(name, s3.join(url, name)) for name in files]
    sizes = {s3.join(url, name): info for name, info in objects.items()}
    tensors = collect_tensors(shards, lambda u: _header(u, sizes[u]), names, s3.join(url, INDEX_NAME))
    directory, lock = _side_folder()
    try:
        objects |= _download_side_files(url, listing, directory)
        ckpt = Checkpoint(directory, tensors, _source(url, objects))
        ckpt.config  # noqa: B018 -- refuse a config.json that is not a JSON object now, not after the merge
    except BaseException:
        _remove(directory, lock)
        raise
    weakref.finalize(ckpt, _remove, directory, lock)  # at exit at the latest
    return ckpt


def _side_folder() -> tuple[Path, int]:
    """A new temporary folder for side files and its lock, held while this process lives; the folders of dead
    processes are removed first."""
    _remove_orphans(Path(tempfile.gettempdir()))
    directory = Path(tempfile.mkdtemp(prefix=SIDE_PREFIX))
    lock = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return directory, lock


def _remove(directory: Path, lock: int) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    os.close(lock)


def _remove_orphans(root: Path) -> None:
    """Remove the side-file folders whose lock no process holds (the lock dies with its process, however it
    dies); a folder without a lock yet is being made."""
    for directory in root.glob(f"{SIDE_PREFIX}*"):
        try:
            lock = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)  # held: its process lives
            continue
        _remove(directory, lock)


def _weight_map(url: str, listing: dict[str, s3.ObjectInfo]) -> dict[str, str]:
    """The index's weight map; every shard it names must be an object under the prefix."""
    index = s3.join(url, INDEX_NAME)
    if listing[INDEX_NAME].size > MAX_INDEX_BYTES:
        raise HeaderError(f"index is larger than {MAX_INDEX_BYTES} bytes", file=index)
    wm = parse_weight_map(s3.read_bytes(index, MAX_INDEX_BYTES)[0], index)
    for tname, fname in wm.items():
        if fname not in listing and not _exists(s3.join(url, fname)):
            raise HeaderError(f"weight_map names a missing shard {shown(fname)}", file=index, tensor=tname)
    return wm


def _exists(url: str) -> bool:
    """Whether a shard below the prefix's top level (`sub/x.safetensors`) exists."""
    try:
        s3.head(url)
    except s3.MissingObject:
        return False
    return True


def _info(url: str, name: str, listing: dict[str, s3.ObjectInfo]) -> s3.ObjectInfo:
    """Size, ETag and version of one object (a HEAD: the listing has no version ids)."""
    info = s3.head(s3.join(url, name))
    listed = listing.get(name)
    if listed is not None and listed.etag != info.etag:
        raise SourceError(
            "the object changed while the checkpoint was being opened: run again", file=s3.join(url, name)
        )
    return info


def _header(url: str, info: s3.ObjectInfo) -> dict[str, TensorInfo]:
    """A shard's header from two ranged GETs (the 8-byte length, then the JSON), checked by the same bounded
    parser as a local file's; the ETag pins both reads to the object that was listed."""
    return header_from_ranges(lambda offset, length: s3.read_range(url, offset, length, info.etag), info.size, url)


def _download_side_files(url: str, listing: dict[str, s3.ObjectInfo], directory: Path) -> dict[str, s3.ObjectInfo]:
    """Config, tokenizer, chat template, remote code, license (as for a local folder), and a chatvec manifest."""
    fetched = {}
    for name in sorted(listing):
        if not _is_side(name):
            continue
        if not name.isprintable() or name in (".", ".."):
            raise SourceError(f"object name {shown(name)} cannot be a local file name", file=s3.join(url, name))
        data, fetched[name] = s3.read_bytes(s3.join(url, name), MAX_SIDE_BYTES)
        (directory / name).write_bytes(data)
    return fetched


def _is_side(name: str) -> bool:
    return name in EXTRA_FILES or is_side_file(name)


def _source(url: str, objects: dict[str, s3.ObjectInfo]) -> dict[str, object]:
    """Where the checkpoint came from, for the manifest and card: the URL and each object's identity."""
    return {
        "url": url,
        "objects": {
            name: {"etag": info.etag, "size": info.size, "version": info.version} for name, info in objects.items()
        },
    }


def object_etags(checkpoints: list[Checkpoint]) -> dict[str, str]:
    """For s3:// checkpoints: each object's URL → the ETag it was planned with (workers read that version only)."""
    found: dict[str, str] = {}
    for ckpt in checkpoints:
        objects = ckpt.source.get("objects")
        if isinstance(objects, dict):
            url = str(ckpt.source["url"])
            found |= {s3.join(url, name): str(info["etag"]) for name, info in objects.items()}
    return found
