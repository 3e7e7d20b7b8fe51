"""A job end to end: resolve sources → plan → lay out → execute units → commit."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .card import model_card
from .dtypes import CONFIG_NAMES, ITEMSIZE, OUTPUT_DTYPES
from .exec.worker import UnitResult, WorkContext
from .io.hub import open_source
from .errors import ChatvecError
from .io.ranges import FileHandles
from .manifest import Tally, read_digest
from .output import JOURNAL_NAME, Journal, check_destination, commit, open_partial
from .plan.layout import Layout, Unit, layout
from .plan.planner import Sources, plan_tensors
from .spec import Recipe, RunOptions


@dataclass(frozen=True)
class Planned:
    recipe: Recipe
    sources: Sources
    layout: Layout


def plan(recipe: Recipe) -> Planned:
    """Open every source and build the full layout; reads headers only."""
    cp = open_source(recipe.cp) if recipe.cp is not None else None
    terms = tuple((t.alpha, open_source(t.plus), open_source(t.minus) if t.minus is not None else None) for t in recipe.terms)
    sources = Sources(cp, terms)
    tensors = plan_tensors(recipe, sources)
    return Planned(recipe, sources, layout(tensors, recipe.max_shard_size, recipe.unit_bytes))


def run(recipe: Recipe, options: RunOptions = RunOptions()) -> Path:
    """Execute a recipe and commit its output directory; return the output path."""
    planned = plan(recipe)
    out = Path(recipe.out)
    check_destination(out, _input_dirs(planned.sources), options.overwrite)
    lay = planned.layout
    work, journaled = open_partial(out, lay, _digest(planned), options.restart)
    tally = Tally(lay)
    todo = []
    for unit in lay.units:
        prior = journaled.get(unit.id)
        if prior is not None and _still_valid(prior, unit, lay, work):
            tally.add(prior)
        else:
            todo.append(unit)
    if len(todo) < len(lay.units):
        print(f"resuming {work}: {len(lay.units) - len(todo)} of {len(lay.units)} units verified from an earlier run",
              file=sys.stderr)
    _execute(planned, work, todo, tally, options)
    meta = {"version": __version__, "kind": recipe.kind, "target": out.name, "recipe": dataclasses.asdict(recipe),
            "sources": _sources_meta(planned.sources)}
    manifest = tally.table(out.name, meta)
    side = planned.sources.cp or planned.sources.terms[0][1]
    chat_dir = planned.sources.terms[0][1].directory if recipe.chat_template_from_chat else None
    config_dtype = CONFIG_NAMES[OUTPUT_DTYPES[recipe.dtype]] if recipe.dtype else None
    commit(work, out, lay, manifest, side.directory, chat_dir, model_card(meta, manifest), config_dtype, options.overwrite)
    return out


def _execute(planned: Planned, work: Path, todo: list[Unit], tally: Tally, options: RunOptions) -> None:
    lay = planned.layout
    ctx = WorkContext.of(lay, str(work))
    backend = _backend(ctx, options)
    journal = Journal(work / JOURNAL_NAME)
    sizes = {u.id: unit_io_bytes(u, lay) for u in todo}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1000, disable=not options.progress,
               desc=f"{planned.recipe.kind} → {Path(planned.recipe.out).name} ({backend.name} × {backend.workers})")

    def on_result(result: UnitResult) -> None:
        tally.add(result)
        journal.append(result)
        bar.update(sizes[result.unit])

    try:
        backend.run(todo, on_result)
    finally:
        bar.close()
        journal.close()
        backend.close()


def _backend(ctx: WorkContext, options: RunOptions):
    if options.backend == "local":
        from .exec.local import LocalBackend

        return LocalBackend(ctx, options.workers or os.cpu_count() or 1)
    if options.backend == "ray":
        from .exec.ray_backend import RayBackend

        return RayBackend(ctx, options.workers, options.address, options.cpus_per_worker)
    raise ValueError(f"unknown backend {options.backend!r}")


def unit_io_bytes(unit: Unit, lay: Layout) -> int:
    """Bytes a unit reads and writes: what the progress bar and GB/s count."""
    total = unit.nbytes
    for seg in unit.segments:
        t = lay.tensors[seg.index].tensor
        count = seg.last - seg.first
        merged = max(0, min(count, t.merge_elems - seg.first))
        total += count * ITEMSIZE[t.cp.dtype] if t.cp else 0
        total += merged * sum(ITEMSIZE[s.dtype] for _, p, m in t.terms for s in (p, m) if s)
    return total


def _still_valid(result: UnitResult, unit: Unit, lay: Layout, work: Path) -> bool:
    """A journaled unit counts only if its bytes on disk still hash to what was journaled."""
    files = FileHandles()
    buf = memoryview(bytearray(lay.unit_bytes))
    journaled = {(s.index, s.block): s.digest for s in result.segments}
    try:
        for seg in unit.segments:
            p = lay.tensors[seg.index]
            size = ITEMSIZE[p.tensor.out_dtype]
            path = str(work / lay.shards[p.shard].name)
            digest = read_digest(files, path, p.offset + seg.first * size, (seg.last - seg.first) * size, buf, p.tensor.name)
            if journaled.get((seg.index, seg.block)) != digest:
                return False
        return True
    except ChatvecError:
        return False
    finally:
        files.close()


def _input_dirs(sources: Sources) -> list[Path]:
    dirs = [sources.cp.directory] if sources.cp else []
    for _, plus, minus in sources.terms:
        dirs += [plus.directory] + ([minus.directory] if minus else [])
    return dirs


def _sources_meta(sources: Sources) -> dict:
    return {"cp": sources.cp.source if sources.cp else None,
            "terms": [{"alpha": a, "plus": p.source, "minus": m.source if m else None} for a, p, m in sources.terms]}


def _digest(planned: Planned) -> str:
    """Identifies a job: its layout and the identity (size, mtime) of every input file."""
    h = hashlib.sha256(repr((planned.layout, dataclasses.asdict(planned.recipe))).encode())
    for path in sorted({s.path for p in planned.layout.tensors for s in _srcs(p.tensor)}):
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _srcs(t):
    return ([t.cp] if t.cp else []) + [s for _, p, m in t.terms for s in (p, m) if s]
