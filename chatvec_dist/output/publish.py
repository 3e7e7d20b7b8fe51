"""An s3:// output's commit: complete each shard's upload, put the other files, the index last.

Runs after the local commit has written every file into the staging work area and before its rename: a crash on
the way leaves no index under the prefix (nothing that looks like a complete model), and the rerun on this machine
commits again (a shard whose upload was completed already is redone: its upload is gone).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ChatvecError, RunError
from ..io import s3, s3_sink
from ..io.checkpoint import INDEX_NAME
from ..log import logger
from ..planning.layout import Layout


def publish(
    work: Path,
    url: str,
    layout: Layout,
    uploads: list[str],
    parts: dict[int, dict[int, str]],
    skip: set[str],
    overwrite: bool,
) -> None:
    """`parts`: each shard's {part number: ETag}; `skip`: the work area's own files (journal, plan, uploads, lock).
    With `overwrite`, the old index goes first and the old objects the new output lacks last."""
    old = _listed(url) if overwrite else {}
    if INDEX_NAME in old:
        s3_sink.delete(s3.join(url, INDEX_NAME))
    for k, shard in enumerate(layout.shards):
        s3_sink.complete(s3.join(url, shard.name), uploads[k], parts.get(k, {}))
    shards = {s.name for s in layout.shards}
    names = sorted(p.name for p in work.iterdir() if p.name not in skip | shards | {INDEX_NAME})
    for name in names:
        s3_sink.put(s3.join(url, name), _read(work / name))
    s3_sink.put(s3.join(url, INDEX_NAME), _read(work / INDEX_NAME))  # last: the model is complete only now
    stale = sorted(set(old) - shards - set(names) - {INDEX_NAME})
    for name in stale:
        s3_sink.delete(s3.join(url, name))
    if stale:
        logger.info(f"removed {len(stale)} object(s) of the replaced output under {url}")


def _listed(url: str) -> dict[str, s3.ObjectInfo]:
    try:
        return s3.list_names(url)
    except ChatvecError as e:
        raise RunError(f"commit failed ({e.what}); fix the cause and run the same command again", file=e.file) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise RunError(f"commit failed ({e.strerror}); run the same command again", file=str(path)) from None
