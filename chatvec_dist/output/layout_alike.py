"""Whether a layout differs from an earlier one only in its terms' alphas: every other input of the manifest's
columns the very same object in both, as planning/reuse.py gives an alpha sweep's targets the first target's (names,
shapes, sources, shards, offsets). Checked object by object in C (`operator.is_`), never by a flag or by equality: a
field added to PlannedTensor, Placed or Term is compared too, and an equal but other object (-0.0 and 0.0, 1 and
1.0) differs.

A layout proven alike is remembered while it lives (`alike`, `known`): the manifest's columns, the index file and
whatever else a layout's inputs but its alphas fix are then made once for all the layouts of one kind."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from itertools import chain
from operator import attrgetter, eq, is_, itemgetter
from typing import Any, NamedTuple

from ..planning.layout import Layout, Placed
from ..planning.planner import PlannedTensor
from ..term import Term


def _but(keys: list, left_out: object, getter: Callable[..., Any] = attrgetter) -> Callable[[Any], tuple]:
    """The fields `keys` but `left_out`, as one tuple (a key twice: a getter of one key gives its value alone)."""
    kept = [key for key in keys if key != left_out]
    return getter(*kept, kept[0])


_PLACED = _but([f.name for f in dataclasses.fields(Placed)], "tensor")
_TENSOR = _but([f.name for f in dataclasses.fields(PlannedTensor)], "terms")
_TERM = _but(list(range(len(Term._fields))), Term._fields.index("alpha"), itemgetter)
_TENSOR_OF, _TERMS = attrgetter("tensor"), attrgetter("terms")


class Inputs:
    """A layout's inputs to the manifest's columns but its terms' alphas, each object end to end (a few pointers per
    tensor): its shards, its Placed's fields but `tensor`, its PlannedTensors' but `terms`, the number of their terms
    and those terms' fields but `alpha`."""

    def __init__(self, layout: Layout) -> None:
        ts = list(map(_TENSOR_OF, layout.tensors))
        terms = list(map(_TERMS, ts))
        self.shards = list(layout.shards)
        self.placed = _flat(_PLACED, layout.tensors)
        self.tensors = _flat(_TENSOR, ts)
        self.counts = list(map(len, terms))
        self.terms = _flat(_TERM, chain.from_iterable(terms))

    def match(self, layout: Layout) -> bool:
        """Whether `layout`'s inputs but its alphas are these very objects."""
        if len(layout.tensors) != len(self.counts) or len(layout.shards) != len(self.shards):
            return False
        ts = list(map(_TENSOR_OF, layout.tensors))
        terms = list(map(_TERMS, ts))
        return (
            _same(self.shards, layout.shards)
            and _same(self.placed, _stream(_PLACED, layout.tensors))
            and _same(self.tensors, _stream(_TENSOR, ts))
            and all(map(eq, self.counts, map(len, terms)))
            and _same(self.terms, _stream(_TERM, chain.from_iterable(terms)))
        )


def _flat(fields: Callable[[Any], tuple], items: Iterable) -> list:
    return list(_stream(fields, items))


def _stream(fields: Callable[[Any], tuple], items: Iterable) -> Iterable:
    """`fields` of each of `items`, end to end."""
    return chain.from_iterable(map(fields, items))


def _same(a: Iterable, b: Iterable) -> bool:
    """Each item of `a` is `b`'s (as many items, in C)."""
    return all(map(is_, a, b))


class _Kind(NamedTuple):
    """Layouts proven alike: each one's inputs but alphas the very objects of `inputs` (those of the first layout)."""

    inputs: Inputs
    members: dict[int, weakref.ref[Layout]]  # by id (each checked to be the very layout)


_kind: list[_Kind] = []  # the last kind of layouts proven alike (one at a time: a batch's targets come in order)


def alike(earlier: Layout, layout: Layout) -> bool:
    """Whether `layout`'s inputs but its terms' alphas are `earlier`'s very objects: `layout` is compared
    (`Inputs.match`) with the first layout of `earlier`'s kind (or with `earlier`, which then starts one), once;
    then `known` while it lives."""
    if known(earlier, layout):
        return True
    kind = next(iter(_kind[:1]), None)
    if kind is None or not _member(kind, earlier):
        kind = _Kind(Inputs(earlier), {id(earlier): weakref.ref(earlier)})
        _kind[:] = [kind]
    if not kind.inputs.match(layout):
        return False
    kind.members[id(layout)] = weakref.ref(layout)
    return True


def known(earlier: Layout, layout: Layout) -> bool:
    """Whether `earlier` and `layout` are one layout, or both of the last kind `alike` proved, as they are now
    (safe from any thread: it reads the kind once)."""
    if earlier is layout:
        return True
    kind = next(iter(_kind[:1]), None)
    return kind is not None and _member(kind, earlier) and _member(kind, layout)


def _member(kind: _Kind, layout: Layout) -> bool:
    ref = kind.members.get(id(layout))
    return ref is not None and ref() is layout
