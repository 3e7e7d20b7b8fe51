"""What one unit needs of the work context: its tensors in each output, their shards, its parts, its input files.

Shipped with each unit to a Ray worker, the plan crosses the wire (and is unpickled) once in all, spread over
the units, rather than whole to every worker: a 45 000-tensor plan of four outputs is ~40 MB and seconds to
unpickle in each worker process."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from itertools import chain
from operator import attrgetter

from ..planning.layout import Placed, Unit
from ..planning.reads import read_files
from .messages import OutputContext, WorkContext

_TENSOR, _SRCS = attrgetter("tensor"), attrgetter("srcs")


def unit_context(ctx: WorkContext, unit: Unit) -> WorkContext:
    """`ctx` cut to `unit`: each output's placed tensors by index, and only the shards, parts, Hub files, ETags
    and TIES pre-pass tensors they name; its other fields as they are."""
    outputs: list[OutputContext] = []
    placed: list[Placed] = []
    for out in ctx.outputs:
        tensors = {p.index: out.tensors[p.index] for p in unit.pieces}
        parts = {unit.id: out.parts.get(unit.id, [])} if out.parts is not None else None
        shards = {p.shard for p in tensors.values()} | {part.shard for part in (parts or {}).get(unit.id, [])}
        placed += tensors.values()
        outputs.append(
            OutputContext(
                tensors,
                {s: out.shard_paths[s] for s in shards},
                {s: out.uploads[s] for s in shards} if out.uploads is not None else None,
                {s: out.headers[s] for s in shards} if out.headers is not None else None,
                parts,
            )
        )
    files = _files(placed) if ctx.hub_files or ctx.etags else set()
    hub = {f: v for f, v in ctx.hub_files.items() if f in files}
    etags = {f: v for f, v in ctx.etags.items() if f in files}
    select = ctx.select
    if select is not None:  # TIES' pre-pass: the unit's tensors to histogram
        indices = {p.index for p in unit.pieces}
        select = dataclasses.replace(select, tensors={i: s for i, s in select.tensors.items() if i in indices})
    return dataclasses.replace(ctx, outputs=outputs, hub_files=hub, etags=etags, select=select)  # any other field kept


def _files(placed: Iterable[Placed]) -> set[str]:
    """Every file the tensors read, each source object once (a batch's outputs share theirs)."""
    srcs = list(chain.from_iterable(map(_SRCS, map(_TENSOR, placed))))
    return read_files(dict(zip(map(id, srcs), srcs)).values())
