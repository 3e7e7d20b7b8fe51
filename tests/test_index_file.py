"""The output's index file: exactly the bytes of `json.dumps(index, indent=2)`, for any tensor and shard names."""

from __future__ import annotations

import dataclasses
import json

from conftest import swept_layout
from hypothesis import given
from hypothesis import strategies as st

from chatvec_dist.output.index_file import indented, index_text
from chatvec_dist.output.layout_alike import alike
from chatvec_dist.planning.layout import Layout, layout
from chatvec_dist.planning.planner import PlannedTensor, Src
from chatvec_dist.term import Term

HOSTILE = ['a"b', "back\\slash", "new\nline\ttab", "é中🙂", "\x00\x1f\x7f", "\ud800", "", "  spaced  ", "{}[],:"]


def reference(total: int, weight_map: dict[str, str]) -> str:
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)


def test_hostile_names_and_an_empty_map_give_indent_2s_text():
    weight_map = {name: f"shard {i} {name}" for i, name in enumerate(HOSTILE)}
    assert indented(12345, weight_map) == reference(12345, weight_map)
    assert indented(0, {}) == reference(0, {}) == '{\n  "metadata": {\n    "total_size": 0\n  },\n  "weight_map": {}\n}'
    assert indented(2**70, {"x": "y"}) == reference(2**70, {"x": "y"})  # an int past int64
    assert indented(7, {"a": "b", "c": "d"}).splitlines() == [
        "{",
        '  "metadata": {',
        '    "total_size": 7',
        "  },",
        '  "weight_map": {',
        '    "a": "b",',
        '    "c": "d"',
        "  }",
        "}",
    ]


@given(st.dictionaries(st.text(), st.text(), max_size=20), st.integers(min_value=0, max_value=2**64))
def test_any_names_give_indent_2s_text(weight_map: dict[str, str], total: int):
    assert indented(total, weight_map) == reference(total, weight_map)


def test_a_layouts_index_names_each_tensors_shard_and_the_total_size():
    tensors = [
        PlannedTensor(name, "merge", "", (n,), "BF16", Src("x", 0, "BF16"), (), n)
        for name, n in [('w."q"', 300), ("b\\ias", 5), ("é", 400), ("z", 1)]
    ]
    lay = layout(tensors, max_shard_size=800)
    assert len(lay.shards) > 1  # several shards: each name maps to its own
    weight_map = {p.tensor.name: lay.shards[p.shard].name for p in lay.tensors}
    total = sum(p.nbytes for p in lay.tensors)
    assert total == 2 * (300 + 5 + 400 + 1)
    assert index_text(lay) == reference(total, weight_map)


def test_a_sweeps_layouts_share_the_index_once_proved_alike_and_no_other_does():
    """A layout proved alike the last one (layout_alike.alike) takes its index text as it is; one that is not, or
    equal but not proved, gets its own, equal to json's, and a renamed tensor's index names it."""
    cp, plus, minus = Src("/m/cp", 8, "BF16"), Src("/m/chat", 8, "BF16"), Src("/m/base", 8, "BF16")
    tensors = [
        PlannedTensor(name, "merge", "", (n,), "BF16", cp, (Term(1.0, plus, minus),), n)
        for name, n in [("a", 300), ("b", 5), ("c", 400)]
    ]
    lay = layout(tensors, max_shard_size=800)
    first = index_text(lay)
    assert first == reference(1410, {p.tensor.name: lay.shards[p.shard].name for p in lay.tensors})
    swept = swept_layout(lay, 0.5)
    unproved = index_text(swept)  # not proved alike yet: made again (equal)
    assert unproved == first and unproved is not first
    assert alike(swept, lay) and index_text(lay) is unproved  # proved: the last one's, as it is
    renamed = Layout(
        [dataclasses.replace(lay.tensors[0], tensor=dataclasses.replace(tensors[0], name="A"))] + lay.tensors[1:],
        lay.shards,
    )
    assert not alike(lay, renamed)
    got = index_text(renamed)
    assert json.loads(got)["weight_map"] == {"A": lay.shards[0].name, "b": lay.shards[0].name, "c": lay.shards[1].name}
    assert got == reference(1410, json.loads(got)["weight_map"])
