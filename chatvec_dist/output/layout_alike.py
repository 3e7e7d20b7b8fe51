"""Whether a layout differs from an earlier one only in its terms' alphas: every other input of the manifest's
columns the very same object in both, as planning/reuse.py gives an alpha sweep's targets the first target's (names,
shapes, sources, shards, offsets). Checked object by object in C (`operator.is_`), never by a flag or by equality: a
field added to PlannedTensor, Placed or Term is compared too, and an equal but other object (-0.0 and 0.0, 1 and
1.0) differs.

A layout proved alike is remembered while it lives (`alike`, `known`): the manifest's columns, the index file and
whatever else a layout's inputs but its alphas fix are then made once for all the layouts of one kind. The job's
digest proves it first, where it can (`record_digested`): fingerprint.py compares every field of every layout with
the one before it by identity, column by column, and reports the columns it had to encode; a layout that differs
only on the way to its alphas is then never compared again."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter, eq, is_, itemgetter
from typing import Any

from ..fingerprint import class_name
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


@dataclass
class _Kind:
    """Layouts proved alike (each one's inputs but alphas the very objects of the others')."""

    members: dict[int, weakref.ref[Layout]]  # by id (each checked to be the very layout)
    inputs: Inputs | None = None  # a member's: made when a layout not known is compared with the kind


_kinds: list[_Kind] = []  # the kinds proved, while some member lives


def alike(earlier: Layout, layout: Layout) -> bool:
    """Whether `layout`'s inputs but its terms' alphas are `earlier`'s very objects: `known`, or compared
    (`Inputs.match`) with `earlier`'s kind (one `earlier` then starts), once; then `known` while it lives."""
    if known(earlier, layout):
        return True
    kind = _kind_of(earlier) or _join(None, earlier)
    if kind.inputs is None:
        kind.inputs = Inputs(earlier)
    if not kind.inputs.match(layout):
        return False
    _join(kind, layout)
    return True


def known(earlier: Layout, layout: Layout) -> bool:
    """Whether `earlier` and `layout` are one layout, or both of a kind proved (safe from any thread: the kinds
    are read once, and a layout joins a kind only once proved)."""
    return earlier is layout or any(_member(k, earlier) and _member(k, layout) for k in list(_kinds))


def record_digested(layouts: list[Layout], encoded: list[set[tuple[str, ...]]]) -> None:
    """Remember as alike each of `layouts` and the one before it where `fingerprint.tree_digests` (which filled
    `encoded`) took every column of it from that one's but on the way to its terms' alphas (every other field, at
    any depth, the very objects), and where both are plain (`_Plain`) with as many terms per tensor: the job's
    digest proves it once, and the commit of each output need not compare again."""
    plain: dict[int, _Plain] = {}  # by index, made where asked
    for k in range(1, len(layouts)):
        earlier, layout = layouts[k - 1], layouts[k]
        if known(earlier, layout) or not encoded[k] <= _ALPHA_PATH:
            continue
        for i in (k - 1, k):
            if i not in plain:
                plain[i] = _Plain(layouts[i])
        if plain[k - 1].ok and plain[k].ok and plain[k - 1].counts == plain[k].counts:
            _join(_kind_of(earlier) or _join(None, earlier), layout)


class _Plain:
    """Whether a layout's columns on the way to its alphas each hold one class (so `tree_digests` compared every
    field but alpha of all its Placed, tensors, terms and Term, in order), and its terms per tensor."""

    def __init__(self, layout: Layout) -> None:
        self.ok, self.counts = False, []
        placed = layout.tensors
        if type(placed) is not list or not set(map(type, placed)) <= {Placed}:
            return
        ts = list(map(_TENSOR_OF, placed))
        if not set(map(type, ts)) <= {PlannedTensor}:
            return
        terms = list(map(_TERMS, ts))
        self.counts = list(map(len, terms))
        self.ok = set(map(type, terms)) <= {tuple} and set(map(type, chain.from_iterable(terms))) <= {Term}


def _place_names() -> set[tuple[str, ...]]:
    """The places of `tree_digests` from a Layout to its terms' alphas: the root, then each column on the way."""
    way = ["tensors", "[]", "tensor", "terms", "[]", "alpha"]
    kinds = [Layout, list, Placed, PlannedTensor, tuple, Term]
    names = [name for kind, field in zip(kinds, way) for name in (class_name(kind), field)]
    return {tuple(names[:i]) for i in range(0, len(names) + 1, 2)}


_ALPHA_PATH = _place_names()


def _kind_of(layout: Layout) -> _Kind | None:
    return next((k for k in list(_kinds) if _member(k, layout)), None)


def _join(kind: _Kind | None, layout: Layout) -> _Kind:
    """Add `layout` to `kind` (None: a new kind, the kinds whose members all died dropped)."""
    if kind is None:
        kind = _Kind({})
        _kinds[:] = [k for k in _kinds if any(ref() is not None for ref in k.members.values())] + [kind]
    kind.members[id(layout)] = weakref.ref(layout)
    return kind


def _member(kind: _Kind, layout: Layout) -> bool:
    ref = kind.members.get(id(layout))
    return ref is not None and ref() is layout
