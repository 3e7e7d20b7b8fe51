"""A digest of a tree of plan objects (dataclasses, named tuples, tuples, lists, dicts, primitives) over a compact
canonical encoding, made column by column: each field of a list of objects of one class is gathered for all of
them at once (C-level `map`s) and encoded as one column, so that a plan of a million tensors costs a few passes,
not a Python `repr` call per object. Every field of every dataclass is covered, fields added later included.

Each column is hashed on its own (sha256) and its parent feeds that digest: a tree of digests, so a column that is
element-wise the very objects of one encoded before in the same call takes that column's digest without encoding
it again. The targets of a batch (an alpha sweep) share almost every sub-object of their layouts, so encoding all
of their layouts costs about one layout plus what differs. A digest is a function of the values alone: a column's
bytes do not depend on where it sits nor on what was encoded before, so a reused digest is the one it would be."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct
from collections.abc import Callable, Iterable
from itertools import chain, compress
from operator import attrgetter, is_
from typing import Any

Feed = Callable[[bytes], object]
PRIMITIVES = frozenset({str, int, float, bool, bytes, type(None)})
# Per place in the tree (classes and fields from the root), the last column encoded there and its digest. The
# columns hold their values (so no id is reused meanwhile); nothing is changed while one call encodes.
Memo = dict[tuple[str, ...], tuple[list[Any], bytes]]


def tree_digest(value: Any) -> bytes:
    """The digest of `value`'s encoding."""
    return _column([value], {}, ())


def tree_digests(values: list[Any], encoded: list[set[tuple[str, ...]]] | None = None) -> list[bytes]:
    """Each value's `tree_digest`; the columns they share (the very same objects at the same place) are encoded
    once for all of them. `encoded`: filled with, per value, the places where it encoded a column (every other
    column of it, at any depth, is the very objects of the value before it: taken from the memo, or below one)."""
    memo: Memo = {}
    digests = []
    for value in values:
        before = dict(memo)
        digests.append(_column([value], memo, ()))
        if encoded is not None:  # an encoded column replaces its place's memo entry; one taken leaves it
            encoded.append({at for at, entry in memo.items() if before.get(at) is not entry})
    return digests


def class_name(kind: type) -> str:
    """A class's name in the places of a tree (`encoded`)."""
    return _name(kind)


def _column(values: list[Any], memo: Memo, at: tuple[str, ...]) -> bytes:
    """The sha256 of a column's encoding, or that of the same objects encoded last at `at`."""
    seen = memo.get(at)
    if seen is not None and len(seen[0]) == len(values) and all(map(is_, seen[0], values)):
        return seen[1]
    return _encoded(values, memo, at)


def _field_column(group: list[Any], name: str, memo: Memo, at: tuple[str, ...]) -> bytes:
    """`_column` of the field `name` of each of `group`, compared with the memo's as it is gathered: a column
    that is the same objects is never made."""
    seen, get = memo.get(at), attrgetter(name)
    if seen is not None and len(seen[0]) == len(group) and all(map(is_, map(get, group), seen[0])):
        return seen[1]
    return _encoded(list(map(get, group)), memo, at)


def _encoded(values: list[Any], memo: Memo, at: tuple[str, ...]) -> bytes:
    """The sha256 of a column's encoding, kept in the memo as the last at `at`."""
    h = hashlib.sha256()
    _feed_column(values, h.update, memo, at)
    digest = h.digest()
    memo[at] = (values, digest)
    return digest


def _feed_column(values: list[Any], feed: Feed, memo: Memo, at: tuple[str, ...]) -> None:
    """Feed the encoding of a column of values: for each class among them (by qualified name), its name and which
    values are of it, then theirs: primitives' exact bytes (`_feed_primitives`), a dataclass's or named tuple's fields
    each as a column, a sequence's (or sorted set's) lengths then its items as one column, a dict's keys then its
    values; anything else by its `repr`. Each chunk is length-prefixed and each sub-column fed as its 32-byte
    digest, so no two different trees feed the same bytes."""
    distinct = sorted(set(map(type, values)), key=_name)
    if len(distinct) == 1:
        _chunk(feed, _name(distinct[0]).encode())
        _feed_group(distinct[0], values, feed, memo, (*at, _name(distinct[0])))
        return
    codes = bytes(map({kind: i for i, kind in enumerate(distinct)}.__getitem__, map(type, values)))
    _chunk(feed, codes)  # each value's class, as its place among the names that follow
    for i, kind in enumerate(distinct):
        _chunk(feed, _name(kind).encode())
        _feed_group(kind, list(compress(values, map(i.__eq__, codes))), feed, memo, (*at, _name(kind)))


def _feed_group(kind: type, group: list[Any], feed: Feed, memo: Memo, at: tuple[str, ...]) -> None:
    if kind in PRIMITIVES:
        _feed_primitives(kind, group, feed)
    elif fields := _fields(kind):
        for name in fields:
            feed(_field_column(group, name, memo, (*at, name)))
    elif issubclass(kind, (tuple, list)):
        _chunk(feed, _lengths(group))
        feed(_column(list(chain.from_iterable(group)), memo, (*at, "[]")))
    elif issubclass(kind, (set, frozenset)):  # in a canonical order, not the process's hash order
        _feed_group(list, [sorted(s, key=repr) for s in group], feed, memo, at)
    elif issubclass(kind, dict):
        _chunk(feed, _lengths(group))
        feed(_column(list(chain.from_iterable(group)), memo, (*at, "{k}")))  # keys, in order
        feed(_column(list(chain.from_iterable(d.values() for d in group)), memo, (*at, "{v}")))
    else:
        _chunk(feed, repr(group).encode("utf-8", "surrogatepass"))


def _feed_primitives(kind: type, group: list[Any], feed: Feed) -> None:
    """Values of one primitive class, exactly: a float's bits (-0.0 is not 0.0), an int's as int64 (or its `repr`
    past that, marked apart), text and bytes as their lengths then all of them."""
    if kind is float:
        _chunk(feed, _packed("d", group))
    elif kind is int:
        try:
            _chunk(feed, b"q" + _packed("q", group))
        except struct.error:
            _chunk(feed, b"r" + repr(group).encode())
    elif kind is str:
        _chunk(feed, _lengths(group))
        _chunk(feed, "".join(group).encode("utf-8", "surrogatepass"))
    elif kind is bytes:
        _chunk(feed, _lengths(group))
        _chunk(feed, b"".join(group))
    elif kind is bool:
        _chunk(feed, bytes(group))
    else:  # None: how many
        _chunk(feed, len(group).to_bytes(8, "little"))


def _lengths(group: list[Any]) -> bytes:
    return _packed("q", map(len, group))


def _packed(code: str, values: Iterable[Any]) -> bytes:
    """Machine numbers, little-endian on any machine (struct.error past their range)."""
    found = list(values)
    return struct.pack(f"<{len(found)}{code}", *found)


@functools.lru_cache(maxsize=256)
def _fields(kind: type) -> tuple[str, ...]:
    """A dataclass's or named tuple's field names; () for any other class."""
    if dataclasses.is_dataclass(kind):
        return tuple(f.name for f in dataclasses.fields(kind))
    return tuple(getattr(kind, "_fields", ())) if issubclass(kind, tuple) else ()


@functools.lru_cache(maxsize=256)
def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _chunk(feed: Feed, data: bytes) -> None:
    feed(len(data).to_bytes(8, "little") + data)
