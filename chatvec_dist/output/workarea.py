"""The output directory: a `.partial` work area with a journal, then an atomic commit by rename."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import ChatvecError, OutputError
from ..exec.messages import UnitResult
from ..log import logger
from ..planning.layout import Layout
from .journal import Journal
from .manifest import MANIFEST_NAME, read_manifest

PLAN_NAME = "plan.json"
JOURNAL_NAME = "journal.bin"  # journal.jsonl before its format 2: a work area with only that one is redone
UPLOADS_NAME = "uploads.json"  # an s3:// output's multipart uploads: [[shard URL, upload id], …]
STAGING_ENV = "CHATVEC_STAGING"


def staging_path(url: str) -> Path:
    """Where an s3:// output's work area, journal, lock and commit live on the driver (S3 has no rename, no
    append, no portable lock): $CHATVEC_STAGING (default ~/.cache/chatvec/s3) / sha256(url)[:16] / last name.
    Its shards there are sparse files holding only their headers: the bytes go to S3 from the workers."""
    root = os.environ.get(STAGING_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "chatvec", "s3")
    name = url.rstrip("/").rpartition("/")[2]
    return Path(os.path.abspath(root)) / hashlib.sha256(url.encode()).hexdigest()[:16] / name


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold `out`'s lock (a hidden file beside it) for a whole run: a second run on the same output is refused,
    rather than let one commit the other's half-written shards."""
    out = out.absolute()
    lock = lock_path(out)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _take_lock(lock, out)
    except OSError as e:
        raise OutputError(f"cannot lock the output: {e.strerror}", file=str(lock)) from None
    try:
        _restore_replaced(out)
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a run that opened it retries on the new file
        os.close(fd)


def _restore_replaced(out: Path) -> None:
    """Put back an output that an interrupted `--overwrite` moved aside (a crash between its two renames, old
    output to `.OUT.replaced`, work area to OUT): the state before that commit, which the same command resumes
    (replacing it, only with --overwrite). Under the lock: no other run is between those renames."""
    old = replaced_path(out)
    if out.exists() or out.is_symlink() or not old.is_dir() or old.is_symlink():
        return
    try:
        old.rename(out)
    except OSError as e:
        raise OutputError(
            f"cannot restore the output an interrupted --overwrite moved here: {e.strerror}", file=str(old)
        ) from None
    logger.warning(f"restored {out} from {old.name}, where an interrupted --overwrite had moved it")


def _take_lock(lock: Path, out: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another chatvec run is writing this output (it holds {lock})", file=str(out)) from None
        except BaseException:
            os.close(fd)
            if not lock.exists():
                continue  # the holder removed the file as we opened it: take the new one
            raise
        os.close(fd)  # the holder removed and a third run re-made it as we opened it: take the new one


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def replaced_path(out: Path) -> Path:
    """Where `--overwrite` moves the old output while the new one is renamed into place (then deletes it)."""
    return out.with_name(f".{out.name}.replaced")


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_destination(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output that exists (unless overwriting), a link to nothing (the commit's rename would fail on
    it, after all the work) or one that lies inside, or contains, an input."""
    if out.is_symlink() and not out.exists():
        raise OutputError(
            f"output is a symbolic link to nothing ({os.readlink(out)}): remove it, or name a folder", file=str(out)
        )
    try:
        real = out.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise OutputError(f"output path cannot be resolved ({e})", file=str(out)) from None
    for src in inputs:
        src = src.resolve()
        for mine in (real, partial_path(real), replaced_path(real)):  # the last two get deleted
            if mine == src or mine.is_relative_to(src) or src.is_relative_to(mine):
                raise OutputError(f"output overlaps the input checkpoint {src}", file=str(out))
    if out.exists() and not overwrite:
        raise OutputError("output exists (pass --overwrite to replace it)", file=str(out))
    if out.exists():
        check_replaceable(out)


def check_replaceable(out: Path) -> None:
    """Refuse to let --overwrite delete anything but an empty directory or a chatvec output (its manifest says so)."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    try:
        read_manifest(out)
    except ChatvecError:
        raise OutputError(
            f"output exists and is not a chatvec output (no readable {MANIFEST_NAME}): --overwrite "
            "replaces only those (or an empty directory); move it away yourself",
            file=str(out),
        ) from None


def open_partial(
    out: Path, layout: Layout, digest: str, inputs: dict[str, list[int | str | None]], restart: bool, output: int
) -> tuple[Path, dict[int, UnitResult]]:
    """Create (or reuse, when it belongs to the same job) the work area; return it and journaled results.
    `inputs`: each input file's [size, mtime, ctime], kept to say which one changed if a rerun differs.
    What is at OUT.partial must have passed `check_work_area` (the caller checks every target's first)."""
    work = partial_path(out)
    plan_file = work / PLAN_NAME
    if work.exists():
        if restart or not (work / JOURNAL_NAME).exists():  # nothing journaled: nothing to lose
            abort_uploads(work)
            shutil.rmtree(work)
        elif (found := _read_plan(plan_file)).get("digest") != digest:
            raise OutputError(_why_not_resumable(found.get("inputs"), inputs), file=str(work))
    path = work
    try:
        work.mkdir(parents=True, exist_ok=True)
        if _read_plan(plan_file).get("digest") != digest:  # first: a work area without it is not chatvec's
            _write_atomically(plan_file, json.dumps({"digest": digest, "inputs": inputs}).encode())
        for shard in layout.shards:  # headers and sizes come from the plan: rewritten, whatever a crash left
            path = work / shard.name
            with open(path, "r+b" if path.exists() else "wb") as f:
                f.write(shard.header)
                f.truncate(shard.size)
    except OSError as e:
        raise OutputError(f"cannot create the output shards: {e.strerror}", file=str(path)) from None
    return work, Journal.load(work / JOURNAL_NAME, output)


def check_work_area(out: Path) -> None:
    """What is at OUT.partial may be reused or deleted only if chatvec made it: a folder holding its plan file
    (written first), or an empty one (a crash before that)."""
    work = partial_path(out)
    if not (work.exists() or work.is_symlink()):
        return
    ours = (
        work.is_dir()
        and not work.is_symlink()
        and ((work / PLAN_NAME).exists() or (work / (PLAN_NAME + ".tmp")).exists() or not any(work.iterdir()))
    )
    if not ours:
        raise OutputError(
            f"this is where the output's work area goes, and it is not one chatvec made (no {PLAN_NAME} "
            "in it): move it away",
            file=str(work),
        )


def discard_if_unused(work: Path) -> None:
    """Remove a work area whose journal holds no finished unit (a run that failed to start): nothing to resume."""
    journal = work / JOURNAL_NAME
    try:
        if not journal.exists() or journal.stat().st_size == 0:
            abort_uploads(work)
            shutil.rmtree(work)
    except (OSError, ChatvecError):
        pass  # left as it is: the next run reuses or replaces it (and aborts its uploads then)


def read_uploads(work: Path) -> list[list[str]]:
    """An s3:// output's multipart uploads, [[shard URL, upload id], …]; empty if none (or unreadable)."""
    try:
        found = json.loads((work / UPLOADS_NAME).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return []
    ok = isinstance(found, list) and all(isinstance(u, list) and len(u) == 2 for u in found)
    return found if ok else []


def write_uploads(work: Path, uploads: list[list[str]]) -> None:
    try:
        _write_atomically(work / UPLOADS_NAME, json.dumps(uploads).encode())
    except OSError as e:
        raise OutputError(f"cannot write the upload ids: {e.strerror}", file=str(work / UPLOADS_NAME)) from None


def abort_uploads(work: Path) -> None:
    """Abort the multipart uploads of a work area about to be deleted: none is left open (a store bills them)."""
    uploads = read_uploads(work)
    if uploads:
        from ..io import s3_sink  # boto3: only for an s3:// output

        for url, upload_id in uploads:
            s3_sink.abort(url, upload_id)
        (work / UPLOADS_NAME).unlink(missing_ok=True)


def work_area_digest(out: Path) -> str | None:
    """The job a work area beside `out` was made for (None: no readable one)."""
    return _read_plan(partial_path(out) / PLAN_NAME).get("digest")


def _read_plan(plan_file: Path) -> dict:
    """What a work area was made for ({"digest", "inputs"}); empty if missing or unreadable (a crash writing it)."""
    try:
        found = json.loads(plan_file.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def changed_field(path: str, then: list | None, now: list) -> str:
    """Which part of an input's identity changed: size/mtime/ctime of a file, size/etag/version of an s3:// object,
    size/sha256/commit of a Hub file."""
    if path.startswith("s3://"):
        fields = ("size", "etag", "version")
    elif len(now) > 1 and isinstance(now[1], str):
        fields = ("size", "sha256", "commit")
    else:
        fields = ("size", "mtime", "ctime")
    return next((name for name, a, b in zip(fields, then or [], now) if a != b), "identity")


def _why_not_resumable(then: object, now: dict[str, list[int | str | None]]) -> str:
    """Why a partial output is not this job's: an input that changed since it was made (named, with the first of
    its fields that differs: size/mtime/ctime of a file, size/etag/version of an s3:// object), or another job."""
    for path, stats in now.items():
        old = then.get(path) if isinstance(then, dict) else None
        if isinstance(old, list) and len(old) == len(stats) and old != stats:
            field = changed_field(path, old, stats)
            how = "; chmod, chown, a new hard link or a rewrite change it" if field == "ctime" else ""
            return (
                f"a partial output is here from before {path} changed ({field}{how}): its finished units may hold "
                "the old bytes (pass --restart to redo them)"
            )
    return "a partial output of a different (or unknown) job is here (pass --restart to discard it)"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
