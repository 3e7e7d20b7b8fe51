"""A digest of a tree of plan objects (dataclasses, named tuples, tuples, lists, dicts, primitives) over a compact
canonical encoding, made column by column: each field of a list of objects of one class is gathered for all of
them at once (C-level `map`s) and encoded as one column, so that a plan of a million tensors costs a few passes,
not a Python `repr` call per object. Every field of every dataclass is covered, fields added later included."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from itertools import chain, compress
from operator import attrgetter
from typing import Any

Feed = Callable[[bytes], object]
PRIMITIVES = frozenset({str, int, float, bool, bytes, type(None)})


def feed_tree(values: list[Any], feed: Feed) -> None:
    """Feed the encoding of a column of values: for each class among them (by qualified name), its name and which
    values are of it, then theirs: a primitive's `repr` (exact for floats), a dataclass's or named tuple's fields
    each as a column, a sequence's (or sorted set's) lengths then its items as one column, a dict's keys then its
    values; anything else by its `repr`. Each chunk is length-prefixed, so no two different trees feed the same
    bytes."""
    distinct = sorted(set(map(type, values)), key=_name)
    if len(distinct) == 1:
        _chunk(feed, _name(distinct[0]))
        _feed_group(distinct[0], values, feed)
        return
    codes = bytes(map({kind: i for i, kind in enumerate(distinct)}.__getitem__, map(type, values)))
    _chunk(feed, repr(codes))  # each value's class, as its place among the names that follow
    for i, kind in enumerate(distinct):
        _chunk(feed, _name(kind))
        _feed_group(kind, list(compress(values, map(i.__eq__, codes))), feed)


def _feed_group(kind: type, group: list[Any], feed: Feed) -> None:
    if kind is bytes:
        _chunk(feed, repr(list(map(len, group))))
        feed(b"".join(group))
    elif kind in PRIMITIVES:
        _chunk(feed, repr(group))
    elif fields := _fields(kind):
        for name in fields:
            feed_tree(list(map(attrgetter(name), group)), feed)
    elif issubclass(kind, (tuple, list)):
        _chunk(feed, repr(list(map(len, group))))
        feed_tree(list(chain.from_iterable(group)), feed)
    elif issubclass(kind, (set, frozenset)):  # in a canonical order, not the process's hash order
        _feed_group(list, [sorted(s, key=repr) for s in group], feed)
    elif issubclass(kind, dict):
        _chunk(feed, repr(list(map(len, group))))
        feed_tree(list(chain.from_iterable(group)), feed)  # keys, in order
        feed_tree(list(chain.from_iterable(d.values() for d in group)), feed)
    else:
        _chunk(feed, repr(group))


@functools.lru_cache(maxsize=256)
def _fields(kind: type) -> tuple[str, ...]:
    """A dataclass's or named tuple's field names; () for any other class."""
    if dataclasses.is_dataclass(kind):
        return tuple(f.name for f in dataclasses.fields(kind))
    return tuple(getattr(kind, "_fields", ())) if issubclass(kind, tuple) else ()


@functools.lru_cache(maxsize=256)
def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _chunk(feed: Feed, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    feed(len(data).to_bytes(8, "little") + data)


def tree_digest(value: Any) -> bytes:
    """The sha256 of `value`'s encoding."""
    h = hashlib.sha256()
    feed_tree([value], h.update)
    return h.digest()


def digests_once(values: list[Any]) -> list[bytes]:
    """Each value's `tree_digest`, made once per object: a layout shared by several targets is encoded once (and
    gives the digest an equal layout of its own would)."""
    done: dict[int, bytes] = {}
    return [done[id(v)] if id(v) in done else done.setdefault(id(v), tree_digest(v)) for v in values]
