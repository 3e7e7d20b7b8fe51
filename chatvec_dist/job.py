"""A job end to end: plan → lock every output → execute the units they share → commit each output."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import __version__, gcpause
from .dtypes import CONFIG_NAMES, OUTPUT_DTYPES
from .errors import ChatvecError, OutputError, PlanError, RunError
from .exec.backend import Backend, make_backend
from .exec.messages import OutputContext, PartResult, Stages, UnitResult, WorkContext
from .fingerprint import tree_digest, tree_digests
from .io import s3
from .io.ranges import FileHandles
from .io.s3_checkpoint import object_etags
from .io.sources import hub_files, hub_identities
from .log import logger
from .output.card import model_card
from .output.commit import WORK_ONLY, check_side_files, commit, tidy_committed
from .output.journal import Journal
from .output.layout_alike import record_digested
from .output.manifest import SharedHashes, Tally, read_manifest
from .output.segment_columns import SegmentColumns, gather, split_outputs
from .output.uploads import Uploads
from .output.verify import read_digest
from .output.workarea import (
    JOURNAL_NAME,
    changed_field,
    check_destination,
    check_work_area,
    discard_if_unused,
    exclusive,
    lock_path,
    open_partial,
    partial_path,
    replaced_path,
    staging_path,
)
from .planning.layout import Layout, Unit
from .planning.plan import Planned, TargetPlan, plan, unit_io_bytes
from .planning.planner import Sources
from .planning.reads import read_files, read_paths, read_srcs
from .recipe.file import with_absolute_paths
from .recipe.spec import Recipe, RunOptions
from .ties_prepass import find_thresholds

MAX_RECHECKS = 3
InputStats = dict[str, list[int | str | None]]  # local file: [size, mtime_ns, ctime_ns]; object: [size, etag, version]


@dataclass
class Output:
    """One target's output directory, and what this run does with it."""

    plan: TargetPlan
    path: Path  # absolute (`.` or `a/..` name a folder too); an s3:// output's staging folder on this machine
    digest: str  # this output's job: version, recipe, plan and input files
    replace: bool = False  # may replace what is at `path` (--overwrite, or this job's own committed output)
    written: bool = False  # committed by this run (False: this job's output was already there)
    work: Path | None = None
    journaled: dict[int, UnitResult] = field(default_factory=dict)  # finished units whose bytes still verify
    tally: Tally | None = None
    uploads: Uploads | None = None  # an s3:// output's multipart uploads
    inputs: InputStats = field(default_factory=dict)  # its input files' identities, as the run started

    def __post_init__(self) -> None:
        if self.plan.to_store and self.uploads is None:
            assert self.plan.target.out is not None
            self.uploads = Uploads(self.plan.target.out, self.plan)

    @property
    def name(self) -> str:
        return self.plan.target.name

    @property
    def url(self) -> str | None:
        """An s3:// output's URL; None for a local one."""
        return self.uploads.url if self.uploads is not None else None

    def is_committed(self) -> bool:
        """Whether `path` holds this very job's committed output (same recipe, plan and input files)."""
        try:
            return read_manifest(self.path)[1].get("job") == self.digest
        except ChatvecError:
            return False

    def check_destination(self, inputs: list[Path]) -> None:
        """Refuse an output that exists (unless overwriting) or overlaps an input (an s3:// output: objects under
        its prefix, see `Uploads.check_destination`)."""
        check_destination(self.path, inputs, self.replace or self.uploads is not None)  # staging: only a cache
        if self.uploads is not None:
            self.uploads.check_destination(self.path, self.digest, self.replace)

    def open(self, planned: Planned, inputs: InputStats, restart: bool, index: int, paths: set[str]) -> None:
        """Make (or reuse) the work area (and an s3:// output's uploads); keep the journaled units whose bytes
        still verify. `paths`: its layout's sources' (`reads.read_paths`)."""
        layout = self.plan.layout
        self.inputs = {path: stats for path, stats in inputs.items() if path in paths}
        self.work, journaled = open_partial(self.path, layout, self.digest, inputs, restart, index)
        self.tally = Tally(layout, planned.block_bytes)
        if self.uploads is not None:
            self.uploads.open(self.work, journaled)
        self.journaled = {uid: r for uid, r in journaled.items() if self.holds(r, planned.block_bytes)}

    def holds(self, result: UnitResult, block: int) -> bool:
        """Whether this output holds the bytes a unit reported (they may be lost with a worker): in its shards, or
        for an s3:// output in its uploads."""
        assert self.work is not None
        if self.uploads is not None:
            return self.uploads.holds(result)
        return _still_valid(result, self.plan.layout, self.work, block)

    def context(self) -> OutputContext:
        """What the workers need of this output: its shard files, or an s3:// output's URLs, uploads and parts."""
        assert self.work is not None
        if self.uploads is not None:
            return self.uploads.context()
        return OutputContext(self.plan.layout.tensors, [str(self.work / s.name) for s in self.plan.layout.shards])

    def record(
        self, result: UnitResult, shared: SharedHashes | None = None, columns: SegmentColumns | None = None
    ) -> None:
        """Add a unit's segments (this output's only) to the manifest's tally; `shared`, `columns`: see
        `Tally.add_all`."""
        assert self.tally is not None
        share = result.seconds / max(1, len(result.segments))
        self.tally.add_all(result.segments, result.worker, result.node, share, shared, columns)
        if self.uploads is not None:
            self.uploads.record(result)

    def side_dirs(self, recipe: Recipe) -> tuple[Path, Path | None]:
        """Where the output's side files come from (CP's folder; the first chat model's when extracting), and the
        chat model's folder where its chat template is asked for."""
        sources = self.plan.sources
        side = sources.cp or sources.terms[0].plus
        return side.directory, sources.terms[0].plus.directory if recipe.chat_template_from_chat else None

    def staged(self, planned: Planned) -> Callable[[], None]:
        """Build the manifest and card; return the commit that writes index, side files, manifest and card (an
        s3:// output: and uploads them) and renames the work area into place."""
        assert self.work is not None and self.tally is not None
        recipe, target, sources = planned.recipe, self.plan.target, self.plan.sources
        meta = {
            "version": __version__,
            "kind": recipe.kind_of(target),
            "target": target.name,
            "recipe": dataclasses.asdict(recipe),
            "sources": _sources_meta(sources),
            "special_tokens": [dataclasses.asdict(r) for r in self.plan.token_rows] or None,
            "job": self.digest,
            "cwd": os.getcwd(),
            "inputs": self.inputs,  # what `verify --sources` finds changed since
        }
        manifest = self.tally.table(target.name, meta)
        side_dir, chat_dir = self.side_dirs(recipe)
        out_dtype = OUTPUT_DTYPES[target.dtype] if target.dtype else "F32" if target.cp is None else None
        config_dtype = CONFIG_NAMES[out_dtype] if out_dtype else None
        card = model_card(meta, manifest)
        replace = self.replace or self.uploads is not None  # the staging copy of an s3:// output: only a cache
        publish = None
        if self.uploads is not None:
            publish = functools.partial(self.uploads.publish, self.work, set(WORK_ONLY), self.replace)
        work = self.work

        def write() -> None:
            commit(
                work, self.path, self.plan.layout, manifest, side_dir, chat_dir, card, config_dtype, replace, publish
            )
            self.written = True

        return write


def run(recipe: Recipe, options: RunOptions | None = None) -> list[Output]:
    """Execute a recipe and commit every target's output directory; outputs this job had already committed are
    left as they are (`written` False) unless `options.restart`."""
    options = options or RunOptions()
    recipe.check_runnable()
    planned = plan(recipe)
    with gcpause.frozen():  # the plan: out of every collection of the run (gcpause)
        return _run(recipe, planned, options)


def _run(recipe: Recipe, planned: Planned, options: RunOptions) -> list[Output]:
    inputs = _input_stats(planned)
    outputs = [Output(tp, _out_path(tp), digest) for tp, digest in zip(planned.targets, _digests(planned, inputs))]
    _check_apart(outputs)
    for output in outputs:
        check_side_files(*output.side_dirs(recipe))
    _to_do(outputs, planned, options)  # refuse early, before any lock file is made
    with contextlib.ExitStack() as locks:
        for output in outputs:
            locks.enter_context(exclusive(output.path))
        fresh = _to_do(outputs, planned, options)  # again, under the locks: another run may have committed meanwhile
        done = [o for o in outputs if o not in fresh]
        if done:  # a rerun after a failure between two targets' commits: the same bytes are there
            for output in done:
                tidy_committed(output.path)
            paths = ", ".join(str(o.path) for o in done)
            logger.info(f"already committed by an earlier run of this job (--restart redoes it): {paths}")
        if fresh:
            _run_fresh(planned, fresh, inputs, options)
    return outputs


def _to_do(outputs: list[Output], planned: Planned, options: RunOptions) -> list[Output]:
    """The outputs to (re)do, each checked for where it goes; --restart redoes this job's own."""
    inputs = [c.directory for tp in planned.targets for c in tp.sources.checkpoints]
    fresh = []
    for output in outputs:
        committed = output.is_committed()
        output.replace = options.overwrite or committed
        if options.restart or not committed:
            output.check_destination(inputs)
            fresh.append(output)
    return fresh


def _out_path(tp: TargetPlan) -> Path:
    """A target's output folder as an absolute path: `.` or `a/..` name a folder too; an s3:// output's staging
    folder on this machine."""
    assert tp.target.out is not None  # Recipe.check_runnable
    return staging_path(tp.target.out) if tp.to_store else Path(os.path.abspath(tp.target.out))


def _check_apart(outputs: list[Output]) -> None:
    """No two targets may share an output, nest one in the other, or meet in each other's work area or lock."""

    def claimed(out: Path) -> list[Path]:
        """The paths a run writes, as it names them: the folders above resolved, the last name as given."""
        try:
            out = out.parent.resolve() / out.name
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise OutputError(f"output path cannot be resolved ({e})", file=str(out)) from None
        return [out, partial_path(out), replaced_path(out), lock_path(out)]

    for first, second in itertools.combinations(outputs, 2):
        mine, theirs = claimed(first.path), claimed(second.path)
        if any(a == b or a.is_relative_to(b) or b.is_relative_to(a) for a in mine for b in theirs):
            what = (
                "both write to this output directory"
                if mine[0] == theirs[0]
                else f"have overlapping outputs: {first.path} and {second.path} (one inside the other, or in the "
                "other's OUT.partial work area beside it)"
            )
            raise OutputError(f"targets '{first.name}' and '{second.name}' {what}", file=str(second.path))


def _run_fresh(planned: Planned, fresh: list[Output], inputs: InputStats, options: RunOptions) -> None:
    """Resume or start the outputs not committed yet (all units stay as planned for every target), then commit."""
    planned = dataclasses.replace(planned, targets=[o.plan for o in fresh])
    for output in fresh:  # all, before any work area is made: a refused one leaves none of the others
        check_work_area(output.path)
    try:
        done = _open_all(planned, fresh, inputs, options.restart)
        todo = [u for u in planned.units if u.id not in done]
        find_thresholds(planned, fresh, todo, options)  # TIES: each tensor's magnitude thresholds, before any unit
        speed = _execute(planned, fresh, todo, options)
    except BaseException:  # a failed start (no GPU, no cluster, no disk) or an interrupt before any unit
        for output in fresh:
            if output.work is not None:
                discard_if_unused(output.work)
        raise
    if options.fail_on_nonfinite:
        _refuse_nonfinite(fresh)
    _check_inputs_unchanged(planned, inputs)
    _commit_all(planned, fresh)
    logger.info(speed)


def _commit_all(planned: Planned, outputs: list[Output]) -> None:
    """Commit each output in turn, the next one's manifest built (Python) while the last one's files are written
    (Parquet, sha256, fsync: mostly outside the GIL). A failed commit stops the later ones, as one after the other."""
    with ThreadPoolExecutor(1, thread_name_prefix="commit") as pool:
        writing: Future[None] | None = None
        for output in outputs:
            try:
                write = output.staged(planned)
            finally:
                if writing is not None:
                    writing.result()  # the earlier output's failure first
            writing = pool.submit(write)
        if writing is not None:
            writing.result()


def _open_all(planned: Planned, outputs: list[Output], inputs: InputStats, restart: bool) -> set[int]:
    """Open every output's work area; return the units that every output still has from an earlier run."""
    paths = read_paths([o.plan.layout for o in outputs])
    for index, output in enumerate(outputs):
        output.open(planned, inputs, restart, index, paths[index])
    done = set.intersection(*(set(o.journaled) for o in outputs))
    for output in outputs:
        for uid in done:
            output.record(output.journaled[uid])
        output.journaled = {}  # in the tally now: kept no longer (they grow with the output's bytes)
    if done:
        logger.info(f"resuming: {len(done)} of {len(planned.units)} units verified from an earlier run")
    return done


def _check_inputs_unchanged(planned: Planned, inputs: InputStats) -> None:
    """Every input file or object is still the one the run started from: one rewritten in place meanwhile (same
    size) would be committed as a mix of old and new bytes."""
    for path, now in _input_stats(planned, inputs).items():
        if now != inputs.get(path):
            raise RunError(
                f"changed during the run ({changed_field(path, inputs.get(path), now)}): nothing was committed, and the "
                "finished units may hold its old bytes; run again with --restart",
                file=path,
            )


def _refuse_nonfinite(outputs: list[Output]) -> None:
    """--fail-on-nonfinite: the first output tensor holding NaN or Inf stops the run before any commit."""
    for output in outputs:
        assert output.tally is not None
        for name, nan, inf in output.tally.nonfinite()[:1]:
            src = next(p.tensor for p in output.plan.layout.tensors if p.tensor.name == name)
            raise PlanError(
                f"{nan} NaN and {inf} Inf in the output of target '{output.name}' (--fail-on-nonfinite); "
                "nothing was committed",
                file=src.cp.path if src.cp else None,
                tensor=name,
            )


def _execute(planned: Planned, outputs: list[Output], todo: list[Unit], options: RunOptions) -> str:
    """Run the units not done yet, journaling each result; return a line on the throughput."""
    started = time.perf_counter()
    works = [o.work for o in outputs]
    assert all(w is not None for w in works)
    inputs = [c for o in outputs for c in o.plan.sources.checkpoints]
    ctx = WorkContext([o.context() for o in outputs], planned.block_bytes, hub_files(inputs), object_etags(inputs))
    backend = make_backend(ctx, options)
    journals = [Journal(w / JOURNAL_NAME) for w in works if w is not None]
    sizes = {u.id: unit_io_bytes(u, planned) for u in todo} if options.progress else {}  # for the bar only
    names = ", ".join(o.path.name for o in outputs)
    progress = _Progress(
        sum(sizes.values()), f"{planned.recipe.kind} → {names} ({backend.name} × {backend.workers})", options.progress
    )
    stages = Stages()

    def on_result(result: UnitResult) -> None:
        stages.add(result.stages)
        with gcpause.kept():  # a unit's rows in the tally: many small objects, no cycle
            shared = SharedHashes()  # the unit's source hashes, for every output (the result holds their objects)
            for output, journal, mine in zip(outputs, journals, _per_output(result, len(outputs))):
                columns = gather(mine.segments)  # once, for the tally and the journal
                output.record(mine, shared, columns)
                journal.append(mine, columns)
        progress.update(sizes.get(result.unit, 0))

    try:
        suspect = backend.run(todo, on_result)
        _redo_lost(planned, outputs, backend, suspect, on_result)
        return throughput(stages, started, time.perf_counter(), backend)
    finally:
        progress.close()
        for j in journals:
            j.close()
        backend.close()


def _per_output(result: UnitResult, count: int) -> list[UnitResult]:
    """Each of `count` outputs' share of a unit's result (its segments and parts), in one pass over them."""
    if count == 1:
        return [result]
    segments = split_outputs(result.segments, count)
    parts: list[list[PartResult]] = [[] for _ in range(count)]
    for p in result.parts:
        parts[p.output].append(p)
    return [dataclasses.replace(result, segments=s, parts=p) for s, p in zip(segments, parts)]


class _Progress:
    """The progress bar, shown from the first finished unit: its rate and ETA leave out the start-up."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.bar: tqdm | None = None

    def update(self, nbytes: int) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=self.total, unit="B", unit_scale=True, unit_divisor=1000, disable=not self.enabled, desc=self.desc
            )
        self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _redo_lost(
    planned: Planned,
    outputs: list[Output],
    backend: Backend,
    suspect: list[Unit],
    on_result: Callable[[UnitResult], None],
) -> None:
    """Units finished by workers that died before their fsync: recheck their bytes (as each output's journal
    reported them: the driver keeps no results), redo those lost."""
    for attempt in range(MAX_RECHECKS + 1):
        if not suspect:
            return
        journaled = [Journal.load(o.work / JOURNAL_NAME, i) for i, o in enumerate(outputs) if o.work is not None]
        lost = [u for u in suspect if not all(_holds(o, j.get(u.id), planned) for o, j in zip(outputs, journaled))]
        if not lost:
            return
        if attempt == MAX_RECHECKS:
            raise RunError(f"units kept losing their bytes with their workers after {MAX_RECHECKS} tries")
        logger.info(f"redoing {len(lost)} unit(s) whose bytes were lost with their worker")
        suspect = backend.run(lost, on_result)


def _holds(output: Output, result: UnitResult | None, planned: Planned) -> bool:
    return result is not None and output.holds(result, planned.block_bytes)


def throughput(stages: Stages, started: float, ended: float, backend: Backend) -> str:
    """One line: bytes moved per wall second, the start-up (until the first worker was ready: Ray, CUDA, the
    kernel's compile), then where the workers spent their time (seconds summed over workers)."""

    def rate(nbytes: int, seconds: float) -> str:
        return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "—"

    moved, wall = stages.bytes_read + stages.bytes_written, ended - started
    startup = (backend.first_ready or ended) - started
    return (
        f"{moved / 1e9:.2f} GB in {wall:.1f} s ({rate(moved, wall)}) on {backend.name} × {backend.workers}, "
        f"start-up {startup:.2f} s and fsync included; "
        f"worker-seconds: read {stages.read:.2f} ({rate(stages.bytes_read, stages.read)}), "
        f"compute {stages.compute:.2f}, hash {stages.hash:.2f}, "
        f"write {stages.write:.2f} ({rate(stages.bytes_written, stages.write)}); fsync {backend.sync_seconds:.2f} s"
    )


def _still_valid(result: UnitResult, lay: Layout, work: Path, block: int) -> bool:
    """A journaled unit counts only if its blocks on disk still hash to what was journaled."""
    files = FileHandles()
    buf = memoryview(bytearray(block))
    try:
        for seg in result.segments:
            p = lay.tensors[seg.index]
            path = str(work / lay.shards[p.shard].name)
            for b, digest in seg.blocks:
                n = max(0, min(block, p.nbytes - b * block))
                if read_digest(files, path, p.offset + b * block, n, buf, p.tensor.name) != digest:
                    return False
        return True
    except (ChatvecError, IndexError):
        return False
    finally:
        files.close()


def _sources_meta(sources: Sources) -> dict:
    return {
        "cp": sources.cp.source if sources.cp else None,
        "vectors": [{"alpha": a, "chat": p.source, "base": m.source if m else None} for a, p, m in sources.terms],
    }


def _input_stats(planned: Planned, paths: Iterable[str] | None = None) -> InputStats:
    """Each input file's size, mtime and ctime (a file rewritten in place with its size and mtime put back still
    changes its ctime), an s3:// object's size, ETag and version id (a HEAD), or a Hub file's size, sha256 and
    commit: part of the job, so a partial output is never resumed on inputs that changed. Of `paths`, by default
    every file the plan reads."""
    if paths is None:
        paths = sorted(read_files(read_srcs(t.layout for t in planned.targets)))
    hub = hub_identities([c for t in planned.targets for c in t.sources.checkpoints])
    stats: InputStats = {}
    for path in paths:
        if s3.is_url(path):
            stats[path] = s3.identity(path)
        elif path in hub:  # fixed by its commit; workers fetch it into their node's cache on first use
            stats[path] = hub[path]
        else:
            st = os.stat(path)
            stats[path] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return stats


def _digests(planned: Planned, inputs: InputStats) -> list[str]:
    """Each output's job: this version, the recipe, all layouts (what their targets share encoded once) and
    units, the inputs' stats (hashed once for all outputs), then the output's own place. The plan is hashed over
    a compact canonical encoding (fingerprint.py), not its `repr`."""
    recipe = with_absolute_paths(planned.recipe, os.getcwd())  # the same job, whichever folder it is run from
    shared = hashlib.sha256(b"chatvec job 3\0")
    encoded: list[set[tuple[str, ...]]] = []
    layouts = tree_digests([t.layout for t in planned.targets], encoded)
    record_digested([t.layout for t in planned.targets], encoded)  # proved alike here: not again at each commit
    shared.update(tree_digest([__version__, recipe, layouts, planned.units, planned.block_bytes]))
    shared.update(json.dumps(inputs, sort_keys=True).encode())
    digests = []
    for index, tp in enumerate(planned.targets):
        h = shared.copy()
        h.update(f"{index}:{_out_path(tp)}".encode())
        digests.append(h.hexdigest())
    return digests
