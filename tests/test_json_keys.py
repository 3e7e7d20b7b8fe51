"""`loads_unique` (the header's and the index's JSON, parsed without a hook where no key can be a duplicate) gives
what parsing with a duplicate-refusing hook gives: the same object, or the same error."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatvec_dist.errors import HeaderError
from chatvec_dist.io.header import loads_unique

KEYS = st.sampled_from(["a", "b", "a:b", ":", '"', "\\", "é", "__metadata__", "dtype"])
SCALARS = st.one_of(st.integers(-5, 5), st.sampled_from(["", "x", "x:y", "::", 'q"', "é", "\\"]), st.none())


class Duplicate(Exception):
    pass


def _refuse(pairs: list[tuple[str, object]]) -> dict:
    """The reference: every object's pairs, refused where a key repeats."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise Duplicate(key)
        seen.add(key)
    return dict(pairs)


def _text(value: object, ascii_only: bool) -> str:
    """JSON text of `value`, where an object is a list of pairs (repeats allowed) tagged ("obj", pairs)."""
    if isinstance(value, tuple):
        pairs = ", ".join(f"{json.dumps(k, ensure_ascii=ascii_only)}: {_text(v, ascii_only)}" for k, v in value[1])
        return "{" + pairs + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def _objects(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.tuples(KEYS, children), max_size=4).map(lambda pairs: ("obj", pairs))


values = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), _objects(inner)), max_leaves=12)


def _same_as_reference(text: str) -> None:
    try:
        expected = json.loads(text, object_pairs_hook=_refuse)
    except Duplicate as e:
        with pytest.raises(HeaderError, match="duplicate key") as raised:
            loads_unique(text)
        assert repr(str(e)) in str(raised.value)
        return
    except ValueError:
        with pytest.raises(ValueError):
            loads_unique(text)
        return
    found = loads_unique(text)
    assert found == expected
    assert json.dumps(found) == json.dumps(expected)  # the same order of keys too


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_objects(st.one_of(values, _objects(values))), st.booleans())
def test_objects_of_objects_parse_as_with_the_hook(doc: tuple, ascii_only: bool):
    _same_as_reference(_text(doc, ascii_only))


@given(values, st.booleans())
def test_any_json_parses_as_with_the_hook(doc: object, ascii_only: bool):
    _same_as_reference(_text(doc, ascii_only))


@pytest.mark.parametrize(
    "text",
    [
        '{"a": {"x": 1, "x": 2}}',  # in an entry
        '{"a": {"x": 1}, "a": {"y": 2}}',  # between entries
        '{"a": {"x": {"k": 1, "k": 1}}}',  # deeper than the counted levels
        '{"a": {"x": [{"k": 1, "k": 1}]}}',  # in a list
        '{"a:b": {"x": 1}, "a:b": {"x": 1}}',  # a name with a colon, repeated
        '{"a": {"x": "dropped: with a colon", "x": "kept"}}',  # the dropped value holds a colon
        '{"a\\u003a": {"x": 1}, "b": {"y": 1, "y": 2}}',  # an escaped colon would balance the dropped pair
        '{"__metadata__": {"t": "12:00"}, "a": {"x": 1, "x": 2}}',
        '{"a": {"x": 1, "x": 2}',  # then invalid: the duplicate is found first, as before
    ],
)
def test_every_duplicate_is_refused(text: str):
    with pytest.raises(HeaderError, match="duplicate key '(x|a|k|a:b|y)' in the JSON header"):
        loads_unique(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"a:b": {"dtype": "U8"}, "c": {"x": [1, 2]}}',
        '{"__metadata__": {"when": "12:00:00", "k:": "v"}, "a": {"x": 1}}',
        '{"a": {"x": "in a value: kept"}}',
        '{"a\\u003a": {"x": 1}}',
        '{"a": {"x": {"y": {"z": 1}}}}',
        "[1, 2]",
        "{}",
    ],
)
def test_documents_without_duplicates_parse_as_json(text: str):
    assert loads_unique(text) == json.loads(text)
