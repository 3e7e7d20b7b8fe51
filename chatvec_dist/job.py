"""A job end to end: resolve sources → plan every target → lay out → execute shared units → commit each."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .dtypes import CONFIG_NAMES, OUTPUT_DTYPES
from .errors import ChatvecError, OutputError, PlanError
from .exec.messages import Stages, UnitResult, WorkContext
from .io.ranges import FileHandles
from .io.sources import hub_files
from .output.card import model_card
from .output.commit import commit, tidy_committed
from .output.journal import Journal
from .output.manifest import Tally, read_manifest
from .output.verify import read_digest
from .output.workarea import (
    JOURNAL_NAME,
    check_destination,
    check_work_area,
    discard_if_unused,
    exclusive,
    lock_path,
    open_partial,
    partial_path,
    replaced_path,
)
from .planning.layout import Layout, Unit
from .planning.plan import Planned, TargetPlan, plan, unit_io_bytes
from .planning.planner import Sources
from .recipe.file import with_absolute_paths
from .recipe.spec import Recipe, RunOptions

MAX_RECHECKS = 3


def run(recipe: Recipe, options: RunOptions = RunOptions()) -> list[Path]:
    """Execute a recipe and commit every target's output directory; return their paths."""
    planned = plan(recipe)
    outs = [Path(os.path.abspath(p.target.out)) for p in planned.targets]  # `.` or `a/..` too: a named folder
    _check_apart(outs, [p.target.name for p in planned.targets])
    inputs = _input_stats(planned)
    digests = [_digest(planned, o, inputs) for o in range(len(outs))]

    def decide() -> tuple[list[int], list[bool]]:
        """The outputs to (re)do and whether each may replace what is there (--restart redoes this job's own)."""
        committed = [_committed(out, digest) for out, digest in zip(outs, digests)]
        fresh = [o for o in range(len(outs)) if options.restart or not committed[o]]
        replace = [options.overwrite or committed[o] for o in range(len(outs))]
        for o in fresh:
            check_destination(outs[o], _input_dirs(planned), replace[o])
        return fresh, replace

    decide()  # refuse early, before any lock file is made
    with contextlib.ExitStack() as locks:
        for out in outs:
            locks.enter_context(exclusive(out))
        fresh, replace = decide()  # again, under the locks: another run may have committed there meanwhile
        if len(fresh) < len(outs):  # a rerun after a failure between two targets' commits: the same bytes are there
            done = [outs[o] for o in range(len(outs)) if o not in fresh]
            for out in done:
                tidy_committed(out)
            print(
                f"already committed by an earlier run of this job (--restart redoes it): {', '.join(map(str, done))}",
                file=sys.stderr,
            )
        if fresh:
            _run_fresh(planned, [(o, outs[o], digests[o], replace[o]) for o in fresh], inputs, options)
    return outs


def _check_apart(outs: list[Path], names: list[str]) -> None:
    """No two targets may share an output, nest one in the other, or meet in each other's work area or lock."""

    def claimed(out: Path) -> list[Path]:
        """The paths a run writes, as it names them: the folders above resolved, the last name as given."""
        try:
            out = out.parent.resolve() / out.name
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise OutputError(f"output path cannot be resolved ({e})", file=str(out)) from None
        return [out, partial_path(out), replaced_path(out), lock_path(out)]

    for i, j in itertools.combinations(range(len(outs)), 2):
        mine, theirs = claimed(outs[i]), claimed(outs[j])
        if any(a == b or a.is_relative_to(b) or b.is_relative_to(a) for a in mine for b in theirs):
            what = (
                "both write to this output directory"
                if mine[0] == theirs[0]
                else f"have overlapping outputs: {outs[i]} and {outs[j]} (one inside the other, or in the other's "
                "OUT.partial work area beside it)"
            )
            raise OutputError(f"targets '{names[i]}' and '{names[j]}' {what}", file=str(outs[j]))


def _run_fresh(
    planned: Planned, fresh: list[tuple[int, Path, str, bool]], inputs: dict[str, list[int]], options: RunOptions
) -> None:
    """Resume or start the outputs not committed yet (all units stay as planned for every target); each
    (index, output, job digest, whether it may replace what is there)."""
    planned = dataclasses.replace(planned, targets=[planned.targets[o] for o, _, _, _ in fresh])
    for _, out, _, _ in fresh:  # all, before any work area is made: a refused one leaves none of the others
        check_work_area(out)
    works, tallies, done = [], [], set(u.id for u in planned.units)
    try:
        for i, (tp, (_, out, digest, _)) in enumerate(zip(planned.targets, fresh)):
            work, journaled = open_partial(out, tp.layout, digest, inputs, options.restart, i)
            tally = Tally(tp.layout, planned.block_bytes)
            valid = {uid: r for uid, r in journaled.items() if _still_valid(r, tp.layout, work, planned.block_bytes)}
            done &= set(valid)
            works.append((work, valid))
            tallies.append(tally)
        for (work, valid), tally in zip(works, tallies):
            for uid in done:
                r = valid[uid]
                for seg in r.segments:
                    tally.add(seg, r.worker, r.node, r.seconds / max(1, len(r.segments)))
        todo = [u for u in planned.units if u.id not in done]
        if done:
            print(f"resuming: {len(done)} of {len(planned.units)} units verified from an earlier run", file=sys.stderr)
        speed = _execute(planned, [w for w, _ in works], todo, tallies, options)
    except (
        BaseException
    ):  # a failed start (no GPU, no cluster, no disk) or an interrupt before any unit: nothing to keep
        for work, _ in works:
            discard_if_unused(work)
        raise
    if options.fail_on_nonfinite:
        for tp, tally in zip(planned.targets, tallies):
            for name, nan, inf in tally.nonfinite()[:1]:
                src = next(p.tensor for p in tp.layout.tensors if p.tensor.name == name)
                raise PlanError(
                    f"{nan} NaN and {inf} Inf in the output of target '{tp.target.name}' "
                    f"(--fail-on-nonfinite); nothing was committed",
                    file=src.cp.path if src.cp else None,
                    tensor=name,
                )
    for tp, (_, out, digest, replace), (work, _), tally in zip(planned.targets, fresh, works, tallies):
        _commit(planned, tp, out, work, tally, replace, digest)
    print(speed, file=sys.stderr)


def _committed(out: Path, digest: str) -> bool:
    """Whether `out` is this very job's committed output (same recipe, plan and input files)."""
    try:
        return read_manifest(out)[1].get("job") == digest
    except ChatvecError:
        return False


def _commit(
    planned: Planned, tp: TargetPlan, out: Path, work: Path, tally: Tally, overwrite: bool, digest: str
) -> None:
    recipe, target = planned.recipe, tp.target
    kind = recipe.kind_of(target)
    meta = {
        "version": __version__,
        "kind": kind,
        "target": target.name,
        "recipe": dataclasses.asdict(recipe),
        "sources": _sources_meta(tp.sources),
        "job": digest,
        "cwd": os.getcwd(),
    }
    manifest = tally.table(target.name, meta)
    side = tp.sources.cp or tp.sources.terms[0].plus
    chat_dir = tp.sources.terms[0].plus.directory if recipe.chat_template_from_chat else None
    out_dtype = OUTPUT_DTYPES[target.dtype] if target.dtype else "F32" if target.cp is None else None  # as planned
    config_dtype = CONFIG_NAMES[out_dtype] if out_dtype else None
    commit(
        work, out, tp.layout, manifest, side.directory, chat_dir, model_card(meta, manifest), config_dtype, overwrite
    )


def _execute(planned: Planned, works: list[Path], todo: list[Unit], tallies: list[Tally], options: RunOptions) -> str:
    """Run the units not done yet, journaling each result; return a line on the throughput."""
    started = time.perf_counter()
    ctx = WorkContext.of(
        [tp.layout for tp in planned.targets],
        [str(w) for w in works],
        planned.block_bytes,
        hub_files([c for tp in planned.targets for c in tp.sources.checkpoints]),
    )
    backend = _backend(ctx, options)
    journals = [Journal(w / JOURNAL_NAME) for w in works]
    sizes = {u.id: unit_io_bytes(u, planned) for u in todo}
    names = ", ".join(Path(tp.target.out).name for tp in planned.targets)
    bar = tqdm(
        total=sum(sizes.values()),
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=not options.progress,
        desc=f"{planned.recipe.kind} → {names} ({backend.name} × {backend.workers})",
    )

    results: dict[int, list[UnitResult]] = {}
    stages = Stages()

    def on_result(result: UnitResult) -> None:
        stages.add(result.stages)
        share = result.seconds / max(1, len(result.segments))
        results[result.unit] = []
        for o, (tally, journal) in enumerate(zip(tallies, journals)):
            mine = dataclasses.replace(result, segments=[s for s in result.segments if s.output == o])
            for seg in mine.segments:
                tally.add(seg, result.worker, result.node, share)
            journal.append(mine)
            results[result.unit].append(mine)
        bar.update(sizes[result.unit])

    try:
        suspect = backend.run(todo, on_result)
        for attempt in range(MAX_RECHECKS + 1):  # units whose worker died after finishing them: redo those lost
            lost = [
                u
                for u in suspect
                if not all(
                    _still_valid(r, tp.layout, w, planned.block_bytes)
                    for r, tp, w in zip(results[u.id], planned.targets, works)
                )
            ]
            if not lost:
                break
            if attempt == MAX_RECHECKS:
                raise ChatvecError(f"units kept losing their bytes with their workers after {MAX_RECHECKS} tries")
            print(f"redoing {len(lost)} unit(s) whose bytes were lost with their worker", file=sys.stderr)
            suspect = backend.run(lost, on_result)
        return throughput(stages, started, time.perf_counter(), backend)
    finally:
        bar.close()
        for j in journals:
            j.close()
        backend.close()


def _backend(ctx: WorkContext, options: RunOptions):
    if options.backend == "local":
        from .exec.local import LocalBackend

        return LocalBackend(ctx, options.workers, options.device)
    if options.backend == "ray":
        from .exec.ray_backend import RayBackend

        return RayBackend(ctx, options.workers, options.address, options.cpus_per_worker, options.device)
    raise ValueError(f"unknown backend {options.backend!r}")


def throughput(stages: Stages, started: float, ended: float, backend) -> str:
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


def _input_dirs(planned: Planned) -> list[Path]:
    return [c.directory for tp in planned.targets for c in tp.sources.checkpoints]


def _sources_meta(sources: Sources) -> dict:
    return {
        "cp": sources.cp.source if sources.cp else None,
        "vectors": [{"alpha": a, "chat": p.source, "base": m.source if m else None} for a, p, m in sources.terms],
    }


def _input_stats(planned: Planned) -> dict[str, list[int]]:
    """Each input file's size, mtime and ctime (a file rewritten in place with its size and mtime put back still
    changes its ctime): part of the job, so a partial output is never resumed on inputs that changed."""
    paths = sorted({s.path for t in planned.targets for p in t.layout.tensors for s in p.tensor.srcs})
    return {path: [st.st_size, st.st_mtime_ns, st.st_ctime_ns] for path in paths for st in [os.stat(path)]}


def _digest(planned: Planned, output: int, inputs: dict[str, list[int]]) -> str:
    """Identifies one output's job: this version, the recipe, all layouts and units, and the inputs' stats."""
    tp = planned.targets[output]
    recipe = with_absolute_paths(planned.recipe, os.getcwd())  # the same job, whichever folder it is run from
    h = hashlib.sha256(
        repr(
            (
                __version__,
                output,
                dataclasses.asdict(recipe),
                [t.layout for t in planned.targets],
                planned.units,
                planned.block_bytes,
            )
        ).encode()
    )
    h.update(json.dumps(inputs, sort_keys=True).encode())
    h.update(os.path.abspath(tp.target.out).encode())
    return h.hexdigest()
