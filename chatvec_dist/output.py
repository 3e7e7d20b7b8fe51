"""The output directory: a `.partial` work area with a journal, then an atomic commit by rename."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from .errors import ChatvecError, OutputError
from .exec.messages import SegmentResult, UnitResult
from .io.checkpoint import INDEX_NAME, NOT_SIDE_PATTERNS, SIDE_PATTERNS, read_json_object
from .kernels.stats import Stats
from .manifest import MANIFEST_NAME, read_manifest, write_manifest
from .planning.layout import Layout

PLAN_NAME = "plan.json"
JOURNAL_NAME = "journal.jsonl"


def side_files(directory: Path) -> list[Path]:
    """CP's files that go next to the output's weights (config, tokenizer, remote code, license), not its index."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.name not in (INDEX_NAME, PLAN_NAME)
        and p.is_file()
        and any(fnmatch.fnmatch(p.name, pattern) for pattern in SIDE_PATTERNS)
        and not any(fnmatch.fnmatch(p.name, pattern) for pattern in NOT_SIDE_PATTERNS)
    )


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
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a run that opened it retries on the new file
        os.close(fd)


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
    """Refuse an output that exists (unless overwriting) or that lies inside, or contains, an input."""
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
        _check_replaceable(out)


def _check_replaceable(out: Path) -> None:
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


class Journal:
    """One output's finished units, one JSON line each, appended as results arrive; read back to resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "a+b")
            self._file.seek(0)
            data = self._file.read()
            self._file.truncate(data.rfind(b"\n") + 1)  # drop a last line a crash cut short
        except OSError as e:
            raise OutputError(f"cannot open the journal: {e.strerror}", file=str(path)) from None

    def append(self, r: UnitResult) -> None:
        segs = [
            [
                s.index,
                [[b, d.hex()] for b, d in s.blocks],
                s.stats.cp_sq,
                s.stats.delta_sq,
                s.stats.update_sq,
                s.stats.nan,
                s.stats.inf,
            ]
            for s in r.segments
        ]
        line = json.dumps({"unit": r.unit, "segments": segs, "worker": r.worker, "node": r.node, "seconds": r.seconds})
        try:
            self._file.write(line.encode() + b"\n")
            self._file.flush()
        except OSError as e:
            raise OutputError(f"cannot append to the journal: {e.strerror}", file=str(self.path)) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # what could not be flushed is a unit to redo, never a wrong one

    @staticmethod
    def load(path: Path, output: int) -> dict[int, UnitResult]:
        results: dict[int, UnitResult] = {}
        if not path.is_file():
            return results
        try:
            lines = path.read_bytes().splitlines()
        except OSError as e:
            raise OutputError(f"cannot read the journal: {e.strerror}", file=str(path)) from None
        for line in lines:
            try:
                d = json.loads(line.decode("utf-8"))
                segs = [
                    SegmentResult(output, i, tuple((b, bytes.fromhex(h)) for b, h in blocks), Stats(c, dl, u, n, f))
                    for i, blocks, c, dl, u, n, f in d["segments"]
                ]
                results[d["unit"]] = UnitResult(d["unit"], segs, d["worker"], d["node"], d["seconds"])
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                continue  # a line cut short or garbled by a crash: that unit is simply redone
        return results


def open_partial(
    out: Path, layout: Layout, digest: str, inputs: dict[str, list[int]], restart: bool, output: int
) -> tuple[Path, dict[int, UnitResult]]:
    """Create (or reuse, when it belongs to the same job) the work area; return it and journaled results.
    `inputs`: each input file's [size, mtime, ctime], kept to say which one changed if a rerun differs.
    What is at OUT.partial must have passed `check_work_area` (the caller checks every target's first)."""
    work = partial_path(out)
    plan_file = work / PLAN_NAME
    if work.exists():
        if restart or not (work / JOURNAL_NAME).exists():  # nothing journaled: nothing to lose
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
            shutil.rmtree(work)
    except OSError:
        pass  # left as it is: the next run reuses or replaces it


def _read_plan(plan_file: Path) -> dict:
    """What a work area was made for ({"digest", "inputs"}); empty if missing or unreadable (a crash writing it)."""
    try:
        found = json.loads(plan_file.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _why_not_resumable(then: object, now: dict[str, list[int]]) -> str:
    """Why a partial output is not this job's: an input that changed since it was made (named), or another job."""
    for path, stats in now.items():
        old = then.get(path) if isinstance(then, dict) else None
        if isinstance(old, list) and len(old) == len(stats) and old != stats:
            field = next(name for name, a, b in zip(("size", "mtime", "ctime"), old, stats) if a != b)
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


def commit(
    work: Path,
    out: Path,
    layout: Layout,
    manifest: pa.Table,
    side_dir: Path | None,
    chat_template_dir: Path | None,
    card: str,
    config_dtype: str | None,
    overwrite: bool,
) -> None:
    """Write index, side files, manifest and card; fsync; rename the work area into place."""
    try:
        _commit(work, out, layout, manifest, side_dir, chat_template_dir, card, config_dtype, overwrite)
    except OSError as e:  # disk full, permissions: the work area stays, resumable, never renamed into place
        raise OutputError(
            f"commit failed ({e.strerror}); fix the cause and run the same command again", file=str(e.filename or work)
        ) from None


def _commit(
    work: Path,
    out: Path,
    layout: Layout,
    manifest: pa.Table,
    side_dir: Path | None,
    chat_template_dir: Path | None,
    card: str,
    config_dtype: str | None,
    overwrite: bool,
) -> None:
    if side_dir is not None:
        for path in side_files(side_dir):
            shutil.copyfile(path, work / path.name)
    if config_dtype and (work / "config.json").is_file():
        config = read_json_object(work / "config.json", OutputError)
        _set_dtype(config, config_dtype)
        (work / "config.json").write_text(json.dumps(config, indent=2))
    if chat_template_dir is not None and side_dir is not None:
        _copy_chat_template(chat_template_dir, side_dir, work)
    weight_map = {p.tensor.name: layout.shards[p.shard].name for p in layout.tensors}
    total = sum(p.nbytes for p in layout.tensors)
    (work / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_manifest(manifest, work / MANIFEST_NAME)
    (work / "README.md").write_text(card, encoding="utf-8")
    for path in work.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(work)
    if out.exists():
        if not overwrite:
            raise OutputError("output appeared while merging (pass --overwrite to replace it)", file=str(out))
        _check_replaceable(out)  # again: whatever is there now is what gets deleted
        old = replaced_path(out)
        _remove(old)  # what an interrupted overwrite left (under this run's lock)
        out.rename(old)
        work.rename(out)
        _remove(old)
    else:
        work.rename(out)
    (out / JOURNAL_NAME).unlink(missing_ok=True)  # only now: until the rename, a failed commit can resume
    (out / PLAN_NAME).unlink(missing_ok=True)
    _fsync_dir(out)
    _fsync_dir(out.parent)


def _copy_chat_template(chat_dir: Path, cp_dir: Path, work: Path) -> None:
    """Give the output the chat model's chat template where CP has none, and the chat model's end-of-sequence
    tokens with it (Llama-3-Instruct ends a turn with <|eot_id|>, which its base's generation config lacks)."""
    if (cp_dir / "chat_template.jinja").is_file() or read_json_object(
        cp_dir / "tokenizer_config.json", OutputError
    ).get("chat_template"):
        return
    tok_path = work / "tokenizer_config.json"
    if (chat_dir / "chat_template.jinja").is_file():
        shutil.copyfile(chat_dir / "chat_template.jinja", work / "chat_template.jinja")
    else:
        template = read_json_object(chat_dir / "tokenizer_config.json", OutputError).get("chat_template")
        if not template:
            return
        tok = read_json_object(tok_path, OutputError)
        tok["chat_template"] = template
        tok_path.write_text(json.dumps(tok, indent=2))
    eos = read_json_object(chat_dir / "generation_config.json", OutputError).get("eos_token_id")
    vocab = read_json_object(work / "config.json", OutputError).get("vocab_size")
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    if ids and isinstance(vocab, int) and any(not isinstance(i, int) or not 0 <= i < vocab for i in ids):
        print(
            f"chatvec: warning: the chat model's end-of-sequence ids {ids} are not all in the output's vocabulary "
            f"({vocab} tokens): its generation config keeps CP's, and the chat template may name tokens CP lacks",
            file=sys.stderr,
        )
    elif ids:
        generation = read_json_object(work / "generation_config.json", OutputError)  # {} when absent
        generation["eos_token_id"] = eos
        (work / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def tidy_committed(out: Path) -> None:
    """Remove what a crash between a commit's rename and its last step left in the committed output."""
    for name in (JOURNAL_NAME, PLAN_NAME):
        (out / name).unlink(missing_ok=True)
    _remove(replaced_path(out.absolute()))


def _set_dtype(config: dict, dtype: str) -> None:
    """The output dtype in a config and in its sub-configs that name one (`text_config` of a multimodal model)."""
    config["torch_dtype"] = config["dtype"] = dtype
    for sub in config.values():
        if isinstance(sub, dict) and ("torch_dtype" in sub or "dtype" in sub):
            _set_dtype(sub, dtype)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
