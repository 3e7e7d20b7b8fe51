"""A shard's header, formatted directly where nothing needs an escape, is byte for byte what `json.dumps` writes,
and reads back as the tensors it lays out."""

from __future__ import annotations

import json
import struct

from hypothesis import given
from hypothesis import strategies as st

from chatvec_dist.io.header import OutEntry, _formatted, encode_header, parse_header_bytes

PLAIN = st.text(alphabet="abz.019_-~ ", min_size=1, max_size=8)
ODD = st.sampled_from(['q"uote', "back\\slash", "é", "\x7f", "tab\t", "__metadata__", "日本"])
DIMS = st.lists(st.one_of(st.integers(0, 2**40), st.just(True)), max_size=3)


def _reference(entries: list[OutEntry], metadata: dict[str, str]) -> bytes:
    doc: dict[str, object] = {"__metadata__": metadata}
    for e in entries:
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


@st.composite
def shards(draw: st.DrawFn, names: st.SearchStrategy[str]) -> list[OutEntry]:
    found, begin = [], 0
    for name in draw(st.lists(names, max_size=6)):
        shape = tuple(draw(DIMS))
        size = draw(st.integers(0, 64))
        found.append(OutEntry(name, draw(st.sampled_from(["F32", "BF16", "I64"])), shape, begin, begin + size))
        begin += size
    return found


METADATA = st.dictionaries(st.sampled_from(["format", "k:", 'q"', "é"]), st.sampled_from(["pt", "1:2", "é"]))


@given(shards(st.one_of(PLAIN, ODD)), METADATA)
def test_every_header_is_what_json_dumps_writes(entries: list[OutEntry], metadata: dict[str, str]):
    assert encode_header(entries, metadata) == _reference(entries, metadata)


@given(shards(PLAIN), METADATA)
def test_plain_names_are_formatted_directly(entries: list[OutEntry], metadata: dict[str, str]):
    plain = len({e.name for e in entries}) == len(entries) and not any(
        type(d) is bool for e in entries for d in e.shape
    )
    formatted = _formatted(entries, metadata)
    assert (formatted is not None) == plain
    if formatted is not None:
        assert formatted.encode() == _reference(entries, metadata)[8:].rstrip(b" ")


def test_a_formatted_header_reads_back():
    entries = [OutEntry("a.weight", "F32", (2, 3), 0, 24), OutEntry("b", "BF16", (4,), 24, 32)]
    assert _formatted(entries, {"format": "pt"}) is not None
    blob = encode_header(entries, {"format": "pt"})
    tensors, metadata = parse_header_bytes(blob, len(blob) + 32)
    assert metadata == {"format": "pt"}
    assert [(t.name, t.dtype, t.shape, t.start - len(blob), t.end - len(blob)) for t in tensors.values()] == [
        ("a.weight", "F32", (2, 3), 0, 24),
        ("b", "BF16", (4,), 24, 32),
    ]
