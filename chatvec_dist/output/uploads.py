"""An s3:// output's multipart uploads: one per shard, kept in the staging work area, checked with ListParts, and
completed by the driver's commit.

The commit runs after the local commit has written every file into the staging work area and before its rename: a
crash on the way leaves no index under the prefix (nothing that looks like a complete model), and the rerun on this
machine commits again. A shard whose upload that commit completed already (its upload is gone) is kept if the
object there is the one its journaled parts assemble (size, and the multipart ETag of their ETags), else redone.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ChatvecError, OutputError, RunError
from ..exec.messages import OutputContext, UnitResult
from ..io import s3, s3_sink
from ..io.checkpoint import INDEX_NAME
from ..log import logger
from ..planning.layout import Layout
from ..planning.plan import TargetPlan
from .manifest import MANIFEST_NAME
from .workarea import read_uploads, work_area_digest, write_uploads


class Uploads:
    """The uploads of one s3:// output, and the parts its units uploaded."""

    def __init__(self, url: str, plan: TargetPlan) -> None:
        assert plan.parts is not None  # planned for every s3:// output
        self.url, self.layout, self.planned = url, plan.layout, plan.parts
        self.ids: list[str] = []  # each shard's upload id
        self.parts: dict[int, dict[int, str]] = {}  # uploaded: shard → {part number: ETag}
        self._listed: dict[int, dict[int, set[tuple[str, int]]]] = {}  # as ListParts shows them

    def shard_url(self, shard: int) -> str:
        return s3.join(self.url, self.layout.shards[shard].name)

    def check_destination(self, staging: Path, digest: str, replace: bool) -> None:
        """Objects under the prefix are replaced only with --overwrite and only if they are a chatvec output (a
        manifest is there), or if this job's own commit put them there before it was interrupted."""
        if work_area_digest(staging) == digest:
            return
        found = s3.list_names(self.url)
        if found and not replace:
            raise OutputError("output exists (pass --overwrite to replace it)", file=self.url)
        if found and MANIFEST_NAME not in found:
            raise OutputError(
                f"output exists and is not a chatvec output (no {MANIFEST_NAME}): --overwrite replaces only "
                "those; remove its objects yourself",
                file=self.url,
            )

    def open(self, work: Path, journaled: dict[int, UnitResult]) -> None:
        """One upload per shard, kept in the work area: those of an earlier run are reused where the store still
        has them (their parts listed, to check `journaled` units by) or completed them already; uploads open under
        the prefix with no work area here (a run on another machine, or a crash before uploads.json) are aborted."""
        urls = [self.shard_url(k) for k in range(len(self.layout.shards))]
        kept = read_uploads(work)
        if [u for u, _ in kept] != urls:
            if aborted := s3_sink.abort_all(self.url):
                logger.warning(f"aborted {aborted} upload(s) left open under {self.url} with no journal here")
            kept = []
        uploads, self.parts, self._listed = [], {}, {}
        for k, url in enumerate(urls):
            listed = s3_sink.listed_parts(url, kept[k][1]) if kept else None
            if listed is None and kept:  # gone: completed by an interrupted commit, or aborted elsewhere
                listed = self._completed(k, journaled)
            if listed is None:  # new, or gone with no object its journaled parts assemble
                uploads.append([url, s3_sink.create_upload(url)])
                listed = {}
            else:
                uploads.append(kept[k])
            self._listed[k] = listed
        if uploads != kept:
            write_uploads(work, uploads)
        self.ids = [upload_id for _, upload_id in uploads]

    def _completed(self, shard: int, journaled: dict[int, UnitResult]) -> dict[int, set[tuple[str, int]]] | None:
        """A shard whose upload an interrupted commit completed: its parts as journaled, if they are every part
        planned for it and the object at its URL is the one they assemble; else None."""
        planned = {p.number: p.size for ps in self.planned.values() for p in ps if p.shard == shard}
        found = {p.number: (p.etag, p.size) for r in journaled.values() for p in r.parts if p.shard == shard}
        if {n: size for n, (_, size) in found.items()} != planned:
            return None
        url = self.shard_url(shard)
        if s3_sink.assembled(url, {n: etag for n, (etag, _) in found.items()}, self.layout.shards[shard].size) is None:
            return None
        logger.info(f"{url}: completed by the interrupted commit of this job, kept")
        return {n: {part} for n, part in found.items()}

    def holds(self, result: UnitResult) -> bool:
        """Whether the uploads hold every part the unit was planned to upload, with the ETag and size reported."""
        planned = {(p.shard, p.number, p.size) for p in self.planned.get(result.unit, [])}
        if {(p.shard, p.number, p.size) for p in result.parts} != planned:
            return False
        for part in result.parts:
            if (part.etag, part.size) not in self._listed.get(part.shard, {}).get(part.number, ()):
                self._listed[part.shard] = s3_sink.listed_parts(self.shard_url(part.shard), self.ids[part.shard]) or {}
                if (part.etag, part.size) not in self._listed[part.shard].get(part.number, ()):
                    return False
        return True

    def record(self, result: UnitResult) -> None:
        for part in result.parts:
            self.parts.setdefault(part.shard, {})[part.number] = part.etag

    def context(self) -> OutputContext:
        """What the workers need: the shards' URLs, upload ids and headers, and each unit's parts."""
        urls = [self.shard_url(k) for k in range(len(self.layout.shards))]
        headers = [s.header for s in self.layout.shards]
        return OutputContext(self.layout.tensors, urls, self.ids, headers, self.planned)

    def publish(self, work: Path, skip: set[str], overwrite: bool) -> None:
        """Complete each shard's upload, put the other files of the work area but `skip`, the index last."""
        publish(work, self.url, self.layout, self.ids, self.parts, skip, overwrite)


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
        s3_sink.complete(s3.join(url, shard.name), uploads[k], parts.get(k, {}), shard.size)
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
