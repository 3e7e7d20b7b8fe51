"""A unit's work context for a Ray worker, its placed tensors as columns: each field of the plan's small objects
(placed and planned tensors, sources, terms) gathered for all of them at once in C (`map`), the columns pickled
as lists of builtins, the objects made again in the worker. Pickle reduces each object by a Python call (~1 µs
each, 230 k objects per output of a 45 k-tensor unit: 4 s for a batch of 8); columns cost a few C passes.

An object column keeps the sharing of its objects: each distinct one (by identity) is encoded once, and every
place that held it gets the one object made from it (a batch's outputs share their sources)."""

from __future__ import annotations

import dataclasses
import pickle
from itertools import chain, compress, count, islice, repeat
from operator import attrgetter, is_not, itemgetter
from typing import Any, NamedTuple

from ..planning.layout import Placed
from ..planning.planner import PlannedTensor, Src
from ..term import Term
from .messages import WorkContext

_BUILTIN = frozenset({str, int, float, bool, bytes, type(None)})


def _getters(cls: type) -> list[Any]:
    """Each field's getter: a dataclass's attributes, a named tuple's items."""
    if dataclasses.is_dataclass(cls):
        return [attrgetter(f.name) for f in dataclasses.fields(cls)]
    return [itemgetter(i) for i in range(len(cls._fields))]  # type: ignore[attr-defined]


# The classes taken apart into columns: made again by calling the class with every field (no other state).
_COLUMNS: dict[type, list[Any]] = {cls: _getters(cls) for cls in (Placed, PlannedTensor, Src, Term)}


class _Objects(NamedTuple):
    cls: type
    fields: list[Any]  # each field's encoded column, of the distinct objects
    where: list[int] | None  # each value's distinct object (None: all distinct)


class _Maybe(NamedTuple):
    present: list[bool]
    values: Any  # the encoded column of those present


class _Tuples(NamedTuple):
    lengths: list[int]
    items: Any  # the encoded column of every tuple's items, end to end


def encode(values: list) -> Any:
    """`values` as columns of builtins where they are objects of `_COLUMNS`' classes (or tuples or None of them);
    anything else as it is (pickled whole)."""
    kinds = set(map(type, values))
    if kinds <= _BUILTIN:
        return values
    if len(kinds) == 2 and type(None) in kinds:
        present = list(map(is_not, values, repeat(None)))
        return _Maybe(present, encode(list(compress(values, present))))
    if len(kinds) != 1:
        return values
    (cls,) = kinds
    if cls is tuple:
        items = list(chain.from_iterable(values))
        if set(map(type, items)) <= _BUILTIN:
            return values
        return _Tuples(list(map(len, values)), encode(items))
    getters = _COLUMNS.get(cls)
    if getters is None:
        return values
    distinct = list(dict(zip(map(id, values), values)).values())
    where = None
    if len(distinct) < len(values):
        place = dict(zip(map(id, distinct), count()))
        where = list(map(place.__getitem__, map(id, values)))
    return _Objects(cls, [encode(list(map(get, distinct))) for get in getters], where)


def decode(encoded: Any) -> list:
    """The values `encode` was given (equal objects, shared where they were)."""
    kind = type(encoded)
    if kind is _Objects:
        made = list(map(encoded.cls, *map(decode, encoded.fields)))
        return made if encoded.where is None else list(map(made.__getitem__, encoded.where))
    if kind is _Maybe:
        present = iter(decode(encoded.values))
        return [next(present) if there else None for there in encoded.present]
    if kind is _Tuples:
        items = iter(decode(encoded.items))
        return [tuple(islice(items, n)) for n in encoded.lengths]
    return encoded


def pack(ctx: WorkContext) -> bytes:
    """A unit's cut of the context (`unit_context`) pickled, each output's placed tensors (by index) as one set of
    columns for all outputs."""
    cuts = [out.tensors for out in ctx.outputs]
    assert all(isinstance(c, dict) for c in cuts), "a unit's cut: placed tensors by index"
    outputs = [dataclasses.replace(out, tensors={}) for out in ctx.outputs]
    indices = list(map(list, cuts))
    placed = list(chain.from_iterable(c.values() for c in cuts))  # type: ignore[union-attr]
    return pickle.dumps((dataclasses.replace(ctx, outputs=outputs), indices, encode(placed)), pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> WorkContext:
    """The context `pack` was given."""
    ctx, indices, encoded = pickle.loads(data)
    placed = iter(decode(encoded))
    outputs = [dataclasses.replace(out, tensors=dict(zip(keys, placed))) for out, keys in zip(ctx.outputs, indices)]
    return dataclasses.replace(ctx, outputs=outputs)
