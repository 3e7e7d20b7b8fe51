"""A unit's work context for a Ray worker, its placed tensors as columns: each field of the plan's small objects
(placed and planned tensors, sources, terms) gathered for all of them at once in C (`map`), the columns pickled
as lists of builtins, the objects made again in the worker. Pickle reduces each object by a Python call (~1 µs
each, 230 k objects per output of a 45 k-tensor unit: 4 s for a batch of 8); columns cost a few C passes.

Each output's placed tensors are encoded on their own, keeping the sharing of their objects: each distinct one (by
identity) is encoded once, and every place that held it gets the one object made from it. A column that is
element-wise the very objects of the last column encoded at the same place (the same field of an earlier output's
objects: an alpha sweep's outputs share all but their alphas) is sent as that place and made once."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from itertools import accumulate, chain, compress, count, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Any, NamedTuple

from ..planning.layout import Placed
from ..planning.planner import PlannedTensor, Src
from ..quickinit import maker, tuple_maker
from ..term import Term
from .messages import WorkContext

_BUILTIN = frozenset({str, int, float, bool, bytes, type(None)})


class _Columns(NamedTuple):
    getters: list[Any]  # each field's
    made: Callable[[list[list]], list]  # the objects of these field columns


def _columns(cls: type) -> _Columns:
    """A dataclass's attributes and `quickinit.maker`, or a named tuple's items and `tuple_maker`."""
    if dataclasses.is_dataclass(cls):
        make = maker(cls)
        return _Columns([attrgetter(f.name) for f in dataclasses.fields(cls)], lambda fields: list(map(make, *fields)))
    make_tuple: Callable[[tuple], Any] = tuple_maker(cls)
    getters = [itemgetter(i) for i in range(len(cls._fields))]  # type: ignore[attr-defined]
    return _Columns(getters, lambda fields: list(map(make_tuple, zip(*fields))))


# The classes taken apart into columns: made again from every field (no other state).
_COLUMNS: dict[type, _Columns] = {cls: _columns(cls) for cls in (Placed, PlannedTensor, Src, Term)}


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


class _Again(NamedTuple):
    at: tuple  # the place of the earlier column of the very same objects


# Per place in the tree of columns (fields and kinds from the root), the last column there: encoded, or made again.
Memo = dict[tuple, list]


def encode(values: list, memo: Memo | None = None, at: tuple = ()) -> Any:
    """`values` as columns of builtins where they are objects of `_COLUMNS`' classes (or tuples or None of them);
    anything else as it is (pickled whole). `memo`: the columns encoded before at each place, for `_Again`."""
    memo = {} if memo is None else memo
    seen = memo.get(at)
    if seen is not None and len(seen) == len(values) and all(map(is_, seen, values)):
        return _Again(at)
    memo[at] = values
    kinds = set(map(type, values))
    if kinds <= _BUILTIN:
        return values
    if len(kinds) == 2 and type(None) in kinds:
        present = list(map(is_not, values, repeat(None)))
        return _Maybe(present, encode(list(compress(values, present)), memo, (*at, "?")))
    if len(kinds) != 1:
        return values
    (cls,) = kinds
    if cls is tuple:
        items = list(chain.from_iterable(values))
        if set(map(type, items)) <= _BUILTIN:
            return values
        return _Tuples(list(map(len, values)), encode(items, memo, (*at, "[]")))
    columns = _COLUMNS.get(cls)
    if columns is None:
        return values
    distinct = list(dict(zip(map(id, values), values)).values())
    where = None
    if len(distinct) < len(values):
        place = dict(zip(map(id, distinct), count()))
        where = list(map(place.__getitem__, map(id, values)))
    return _Objects(cls, [_field(distinct, get, memo, (*at, k)) for k, get in enumerate(columns.getters)], where)


def _field(objects: list, get: Any, memo: Memo, at: tuple) -> Any:
    """`encode` of a field of `objects`, compared with the memo's column as it is gathered."""
    seen = memo.get(at)
    if seen is not None and len(seen) == len(objects) and all(map(is_, map(get, objects), seen)):
        return _Again(at)
    return encode(list(map(get, objects)), memo, at)


def decode(encoded: Any, made: Memo | None = None, at: tuple = ()) -> list:
    """The values `encode` was given (equal objects, shared where they were), the columns decoded before at each
    place in `made` (in `encode`'s order)."""
    made = {} if made is None else made
    kind = type(encoded)
    if kind is _Again:
        return made[encoded.at]
    if kind is _Objects:
        values = _COLUMNS[encoded.cls].made([decode(c, made, (*at, k)) for k, c in enumerate(encoded.fields)])
        if encoded.where is not None:
            values = list(map(values.__getitem__, encoded.where))
    elif kind is _Maybe:
        present = iter(decode(encoded.values, made, (*at, "?")))
        values = [next(present) if there else None for there in encoded.present]
    elif kind is _Tuples:
        items = tuple(decode(encoded.items, made, (*at, "[]")))
        ends = list(accumulate(encoded.lengths))
        values = list(map(items.__getitem__, map(slice, [0, *ends], ends)))
    else:
        values = encoded
    made[at] = values
    return values


def pack(ctx: WorkContext) -> bytes:
    """A unit's cut of the context (`unit_context`) pickled, each output's placed tensors (by index) as columns,
    those an earlier output has sent as its."""
    cuts = [out.tensors for out in ctx.outputs]
    assert all(isinstance(c, dict) for c in cuts), "a unit's cut: placed tensors by index"
    outputs = [dataclasses.replace(out, tensors={}) for out in ctx.outputs]
    memo: Memo = {}
    columns = [(list(c), encode(list(c.values()), memo)) for c in cuts]  # type: ignore[union-attr]
    return pickle.dumps((dataclasses.replace(ctx, outputs=outputs), columns), pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> WorkContext:
    """The context `pack` was given."""
    ctx, columns = pickle.loads(data)
    made: Memo = {}
    tensors = [dict(zip(keys, decode(encoded, made))) for keys, encoded in columns]
    outputs = [dataclasses.replace(out, tensors=placed) for out, placed in zip(ctx.outputs, tensors)]
    return dataclasses.replace(ctx, outputs=outputs)
