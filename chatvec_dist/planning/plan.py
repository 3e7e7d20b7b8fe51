"""A whole job's plan: every target planned and laid out from the headers, and the units that serve them all."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .. import gcpause
from ..dtypes import ITEMSIZE
from ..errors import ChatvecError, PlanError
from ..io import s3
from ..io.checkpoint import Checkpoint
from ..io.sources import open_source
from ..output.manifest import read_manifest
from ..recipe.spec import Recipe, Target
from ..term import Term
from .fp8 import check_combined_alike, check_store_pairs, scale_elems
from .layout import Layout, Piece, Unit, block_bytes, byte_rank, cut_units
from .planner import PlannedTensor, Sources, Src, plan_tensors
from .reuse import Reuse, TargetTensors
from .tokens import TokenRow, token_rows, with_token_rows
from .vectors import Sides

if TYPE_CHECKING:
    from .parts import Part


@dataclass(frozen=True)
class TargetPlan:
    target: Target
    sources: Sources
    layout: Layout
    parts: dict[int, list[Part]] | None = None  # an s3:// output's multipart layout: each unit's parts, by unit id
    token_rows: tuple[TokenRow, ...] = ()  # special_tokens resolved: CP's rows that take the chat model's

    @property
    def to_store(self) -> bool:
        """Whether this output goes to an object store (s3://): written as one multipart upload per shard."""
        return _to_store(self.target)


@dataclass(frozen=True)
class Planned:
    recipe: Recipe
    targets: list[TargetPlan]
    units: list[Unit]
    block_bytes: int


def plan(recipe: Recipe) -> Planned:
    """Open every source once and lay out every target; reads headers only."""
    # a million small objects and no cycles, out of the collections while made (see gcpause); nothing stays frozen
    # after: the process goes on (a library's caller), and `job.run` freezes the plan again for its run
    with gcpause.frozen(), gcpause.kept():
        return _plan(recipe)


def _plan(recipe: Recipe) -> Planned:
    if not recipe.vectors or not recipe.targets:
        raise PlanError("a recipe needs at least one vector and one target")
    opened: dict[str, Checkpoint] = {}

    def source(spec: str) -> Checkpoint:
        if spec not in opened:
            opened[spec] = open_source(spec)
        return opened[spec]

    vectors = [(source(v.chat), source(v.base) if v.base is not None else None) for v in recipe.vectors]
    for chat, base in vectors:
        if base is None:
            _check_is_a_vector(chat)
    reuse = Reuse()
    at_shards = any(_to_store(t) for t in recipe.targets)  # a unit's bytes in a shard: one part of its upload
    planned: list[_Planned] = []
    for target in recipe.targets:
        if len(target.alphas) != len(vectors):
            raise PlanError(f"target '{target.name}' has {len(target.alphas)} alphas for {len(vectors)} vectors")
        sources = Sources(
            source(target.cp) if target.cp is not None else None,
            tuple(Term(a, chat, base) for a, (chat, base) in zip(target.alphas, vectors)),
            tuple(v.dare for v in recipe.vectors),
        )
        tensors, rows = reuse.tensors(target, lambda: _plan_target(target, sources, reuse.sides))  # noqa: B023
        check_store_pairs(target.out, tensors, at_shards)
        planned.append(_Planned(target, sources, tensors, rows))
    plans = _lay_out(planned, reuse, recipe.max_shard_size, at_shards)
    units = cut_units([p.layout for p in plans], recipe.unit_bytes, at_shards=at_shards)
    plans = [dataclasses.replace(p, parts=_parts(p, units)) if p.to_store else p for p in plans]
    return Planned(recipe, plans, units, block_bytes(recipe.unit_bytes))


def _lay_out(planned: list[_Planned], reuse: Reuse, max_shard_size: int, at_shards: bool) -> list[TargetPlan]:
    """Each target's layout, every one in the order of the lead: the first target with an object-store output
    (whose shards take each tensor in byte order), else the first target."""
    if at_shards:
        check_combined_alike([(p.target, p.tensors) for p in planned])
    lead = next((p for p in planned if _to_store(p.target)), planned[0])
    order = [t.name for t in (sorted(lead.tensors, key=lambda t: -byte_rank(t, True)) if at_shards else lead.tensors)]
    plans = []
    for p in planned:
        tensors = p.tensors
        if list(map(_NAME, tensors)) != order:  # else in the lead's order already: a batch's targets, mostly
            by_name = {t.name: t for t in tensors}
            if p is not lead:
                _check_like(p, lead, set(by_name) ^ set(order))
            tensors = [by_name[n] for n in order]
        lay = reuse.layout(tensors, max_shard_size, at_shards)
        plans.append(TargetPlan(p.target, p.sources, lay, token_rows=p.rows))
    return plans


_NAME = operator.attrgetter("name")


class _Planned(NamedTuple):
    """A target's tensors before layout."""

    target: Target
    sources: Sources
    tensors: list[PlannedTensor]
    rows: tuple[TokenRow, ...]


def _check_like(planned: _Planned, lead: _Planned, odd: set[str]) -> None:
    """A batched target has the lead target's tensor names (`odd`: the names in only one of them)."""
    if odd:
        raise PlanError(
            f"target '{planned.target.name}' and '{lead.target.name}' differ in tensor names "
            f"(batched targets must share an architecture)",
            file=planned.target.cp,
            tensor=min(odd),
        )


def _plan_target(target: Target, sources: Sources, sides: Sides | None) -> TargetTensors:
    """One target's tensors and token rows (`Reuse` skips this for a target planned alike before); `sides`: the
    vectors' pairings, shared by the job's targets."""
    rows = token_rows(target, sources)
    return with_token_rows(plan_tensors(target, sources, sides), rows, sources), rows


def _to_store(target: Target) -> bool:
    return target.out is not None and s3.is_url(target.out)


def _parts(tp: TargetPlan, units: list[Unit]) -> dict[int, list[Part]]:
    """An s3:// output's parts, planned now: a layout the store cannot take is refused before any work, naming
    the shard's URL."""
    from .parts import plan_parts  # parts.py builds on this module

    try:
        return plan_parts(tp.layout, units)
    except PlanError as e:
        assert tp.target.out is not None
        raise PlanError(e.what, file=tp.target.out.rstrip("/") + "/" + str(e.file)) from None


def _check_is_a_vector(ckpt: Checkpoint) -> None:
    """`apply --vector` takes what `chatvec extract` wrote; a chatvec merge output is refused (a model is not a
    difference of models). A checkpoint without a manifest is taken on trust (a vector made by another tool)."""
    try:
        kind = read_manifest(ckpt.directory)[1].get("kind")
    except ChatvecError:
        return
    if kind != "extract":
        raise PlanError(
            f"a chatvec {kind} output, not a chat vector: --vector takes what `chatvec extract` writes "
            "(or give --base and --chat to merge)",
            file=str(ckpt.directory),
        )


def unit_io_bytes(unit: Unit, planned: Planned) -> int:
    """Bytes a unit reads and writes: what the progress bar and GB/s count."""
    total = 0
    for piece in unit.pieces:
        tensors = [tp.layout.tensors[piece.index].tensor for tp in planned.targets]
        total += sum(count * ITEMSIZE[src.dtype] for src, count in input_needs(piece, tensors).items())
        total += sum(span(t, piece)[0] * ITEMSIZE[t.out_dtype] for t in tensors)
    return total


def total_io_bytes(planned: Planned) -> int:
    """Every unit's `unit_io_bytes`, summed per tensor instead (the units' pieces tile each tensor)."""
    total = 0
    for index in range(len(planned.targets[0].layout.tensors)):
        tensors = [tp.layout.tensors[index].tensor for tp in planned.targets]
        whole = Piece(index, 0, max(t.numel for t in tensors))
        total += sum(count * ITEMSIZE[src.dtype] for src, count in input_needs(whole, tensors).items())
        total += sum(t.numel * ITEMSIZE[t.out_dtype] for t in tensors)
    return total


def span(t: PlannedTensor, piece: Piece) -> tuple[int, int]:
    """(elements of the piece inside this output's tensor, of those how many get the vectors)."""
    count = max(0, min(piece.last, t.numel) - piece.first)
    return count, max(0, min(count, t.merge_elems - piece.first))


def input_needs(piece: Piece, tensors: list[PlannedTensor]) -> dict[Src, int]:
    """Elements to read from each distinct source for a piece, across all outputs' versions of a tensor."""
    need: dict[Src, int] = {}
    if len(tensors) > 1:  # outputs planned alike share their tensor: once is enough
        tensors = list({id(t): t for t in tensors}.values())
    for t in tensors:
        count, merged = span(t, piece)
        scaled = t.row_src is not None and t.row_src.scale is not None
        if t.cp is not None:
            need[t.cp] = max(need.get(t.cp, 0), count)
            scaled = scaled or t.cp.scale is not None
        for _, plus, minus in t.terms:
            for src in (plus, minus):
                if src is not None:
                    need[src] = max(need.get(src, 0), merged)
                    scaled = scaled or src.scale is not None
        if scaled:  # a block-scaled FP8 source: its scales too (its piece is the whole tensor)
            for src in t.srcs:
                if src.scale is not None:
                    need[src.scale] = scale_elems(need[src], t.shape[-1])
    return need
