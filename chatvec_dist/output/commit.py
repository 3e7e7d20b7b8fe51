"""The commit: side files, index, manifest, card and file digests written into the work area, fsynced, renamed
into place."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ChatvecError, OutputError, RunError, SourceError
from ..io.checkpoint import INDEX_NAME, NOT_SIDE_PATTERNS, SIDE_PATTERNS, read_json_object
from ..log import logger
from ..planning.layout import Layout
from .digests import DIGESTS_NAME, encode_digests, file_digests
from .index_file import index_text
from .manifest import MANIFEST_NAME, META_KEY, write_manifest
from .workarea import JOURNAL_NAME, PLAN_NAME, UPLOADS_NAME, check_replaceable, replaced_path

# The work area's own files: never part of the output.
WORK_ONLY = (JOURNAL_NAME, PLAN_NAME, PLAN_NAME + ".tmp", UPLOADS_NAME, UPLOADS_NAME + ".tmp")


# fnmatch's patterns as one regular expression each (a CP of hundreds of shards: one match per file, not ten)
_SIDE, _NOT_SIDE = (re.compile("|".join(map(fnmatch.translate, p))) for p in (SIDE_PATTERNS, NOT_SIDE_PATTERNS))


def side_files(directory: Path) -> list[Path]:
    """CP's files that go next to the output's weights (config, tokenizer, remote code, license), not its index."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.name not in (INDEX_NAME, PLAN_NAME) and _SIDE.match(p.name) and not _NOT_SIDE.match(p.name) and p.is_file()
    )


def check_side_files(side_dir: Path, chat_template_dir: Path | None) -> None:
    """Read now every JSON file the commit will parse (CP's config, tokenizer and generation config; the chat
    model's with --chat-template-from-chat), so that a broken one stops the job before its first unit."""
    names = ["config.json", "tokenizer_config.json", "generation_config.json"]
    for directory in [side_dir] + ([chat_template_dir] if chat_template_dir is not None else []):
        for name in names:
            read_json_object(directory / name, SourceError)


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
    publish: Callable[[], None] | None = None,
) -> None:
    """Write index, side files, manifest, card and file digests; fsync; `publish` (an s3:// output: upload them);
    rename the work area into place. A failure on the way (disk full, permissions) is a RunError naming the path
    being written: the work area stays, resumable, never renamed into place."""
    with _failing_as_run(work):
        _write_files(work, layout, manifest, side_dir, chat_template_dir, card, config_dtype)
        for path in work.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(work)
        if publish is not None:
            publish()
        _rename_into_place(work, out, overwrite)
        for name in WORK_ONLY:  # only now: until the rename, a failed commit can resume
            (out / name).unlink(missing_ok=True)
        _fsync_dir(out)
        _fsync_dir(out.parent)


@contextlib.contextmanager
def _failing_as_run(work: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise RunError(
            f"commit failed ({e.strerror}); fix the cause and run the same command again", file=str(e.filename or work)
        ) from None


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` names it (a disk-full copy names its source, a failed write nothing)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def _write(path: Path, text: str) -> None:
    with _writing(path):
        path.write_text(text, encoding="utf-8")


def _write_files(
    work: Path,
    layout: Layout,
    manifest: pa.Table,
    side_dir: Path | None,
    chat_template_dir: Path | None,
    card: str,
    config_dtype: str | None,
) -> None:
    """Side files (config with the output dtype, chat template), index, manifest, card, and last the digests."""
    if side_dir is not None:
        for path in side_files(side_dir):
            _copy(path, work / path.name)
    fp8 = pc.any(pc.starts_with(manifest.column("dtype_out"), "F8")).as_py()  # each tensor's output dtype, in C
    _rewrite_config(work, config_dtype, bool(fp8))
    if chat_template_dir is not None and side_dir is not None:
        _copy_chat_template(chat_template_dir, side_dir, work, _cp_ids(manifest))
    _write(work / INDEX_NAME, index_text(layout))
    with _writing(work / MANIFEST_NAME):
        write_manifest(manifest, work / MANIFEST_NAME)
    _write(work / "README.md", card)
    _write_digests(work, layout)  # last: it lists every other file


def _copy(src: Path, dst: Path) -> None:
    """Copy a side file: an error reading names the input, one writing (disk full) the output file."""
    data = src.read_bytes()
    with _writing(dst):
        dst.write_bytes(data)


def _write_digests(work: Path, layout: Layout) -> None:
    """Record the size and sha256 of every file of the output (of each shard's header bytes: the manifest
    hashes its tensor data)."""
    headers = {shard.name: len(shard.header) for shard in layout.shards}
    try:
        files = file_digests(work, headers, set(WORK_ONLY))
    except ChatvecError as e:  # a file of the work area that cannot be read back
        raise RunError(f"commit failed ({e.what}); fix the cause and run the same command again", file=e.file) from None
    with _writing(work / DIGESTS_NAME):
        (work / DIGESTS_NAME).write_bytes(encode_digests(files))


def _rename_into_place(work: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise OutputError("output appeared while merging (pass --overwrite to replace it)", file=str(out))
        check_replaceable(out)  # again: whatever is there now is what gets deleted
        old = replaced_path(out)
        _remove(old)  # what an interrupted overwrite left (under this run's lock)
        out.rename(old)  # a crash from here to the next rename: the next run's lock puts it back (workarea.py)
        work.rename(out)
        _remove(old)
    else:
        work.rename(out)


def _cp_ids(manifest: pa.Table) -> dict[int, int]:
    """Chat token id → CP's, for the rows the output took from the chat model (`special_tokens`; the lowest CP id
    where several take the same chat row)."""
    rows = json.loads((manifest.schema.metadata or {}).get(META_KEY, b"{}")).get("special_tokens") or []
    return {r["chat"]: r["cp"] for r in reversed(rows)}


def _copy_chat_template(chat_dir: Path, cp_dir: Path, work: Path, cp_ids: dict[int, int]) -> None:
    """Give the output the chat model's chat template where CP has none, and the chat model's end-of-sequence
    tokens with it (Llama-3-Instruct ends a turn with <|eot_id|>, which its base's generation config lacks), as CP's
    ids where the output took that token's rows from the chat model (`cp_ids`)."""
    if (cp_dir / "chat_template.jinja").is_file() or read_json_object(
        cp_dir / "tokenizer_config.json", OutputError
    ).get("chat_template"):
        return
    tok_path = work / "tokenizer_config.json"
    if (chat_dir / "chat_template.jinja").is_file():
        _copy(chat_dir / "chat_template.jinja", work / "chat_template.jinja")
    else:
        template = read_json_object(chat_dir / "tokenizer_config.json", OutputError).get("chat_template")
        if not template:
            return
        tok = read_json_object(tok_path, OutputError)
        tok["chat_template"] = template
        _write(tok_path, json.dumps(tok, indent=2))
    eos = read_json_object(chat_dir / "generation_config.json", OutputError).get("eos_token_id")
    vocab = read_json_object(work / "config.json", OutputError).get("vocab_size")
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    ids = [cp_ids.get(i, i) if isinstance(i, int) else i for i in ids]
    eos = ids if isinstance(eos, list) else ids[0] if ids else eos
    if ids and isinstance(vocab, int) and any(not isinstance(i, int) or not 0 <= i < vocab for i in ids):
        logger.warning(
            f"the chat model's end-of-sequence ids {ids} are not all in the output's vocabulary "
            f"({vocab} tokens): its generation config keeps CP's, and the chat template may name tokens CP lacks"
        )
    elif ids:
        generation = read_json_object(work / "generation_config.json", OutputError)  # {} when absent
        generation["eos_token_id"] = eos
        _write(work / "generation_config.json", json.dumps(generation, indent=2))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def tidy_committed(out: Path) -> None:
    """Remove what a crash between a commit's rename and its last step left in the committed output."""
    for name in WORK_ONLY:
        (out / name).unlink(missing_ok=True)
    _remove(replaced_path(out.absolute()))


def _rewrite_config(work: Path, dtype: str | None, fp8: bool) -> None:
    """CP's config with the output dtype; without its `quantization_config` when no weight is written as FP8."""
    path = work / "config.json"
    if not path.is_file():
        return
    config = read_json_object(path, OutputError)
    dequantized = not fp8 and config.pop("quantization_config", None) is not None
    if dtype:
        _set_dtype(config, dtype)
    if dtype or dequantized:
        _write(path, json.dumps(config, indent=2))


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
