"""The fast paths of header, index and name checks give the errors the per-entry loops give, naming the first
problem in file order."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatvec_dist.errors import HeaderError
from chatvec_dist.io.checkpoint import collect_tensors, parse_weight_map
from chatvec_dist.io.header import TensorInfo, parse_header_bytes
from chatvec_dist.planning.planner import VOCAB_TENSOR, is_vocab_name


def _blob(header: str, data: int = 0) -> tuple[bytes, int]:
    body = header.encode()
    return struct.pack("<Q", len(body)) + body, 8 + len(body) + data


def _entries(names: list[str]) -> str:
    return "{" + ",".join(
        f'"{n}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i, n in enumerate(names)
    )


def test_a_duplicate_key_is_named_wherever_it_is():
    blob, size = _blob(_entries(["a", "b", "a"]) + "}", 3)
    with pytest.raises(HeaderError, match="duplicate key 'a' in the JSON header"):
        parse_header_bytes(blob, size, "f")
    blob, size = _blob('{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', 1)
    with pytest.raises(HeaderError, match="duplicate key 'dtype'"):
        parse_header_bytes(blob, size, "f")


@pytest.mark.parametrize(
    ("names", "bad"),
    [(["ok", "b\\u0001", "c\\u0002"], "'b\\x01'"), (["ok", ""], "''"), (["x" * 1025], "'xxx")],
)
def test_the_first_unsafe_tensor_name_is_named(names, bad):
    blob, size = _blob(_entries(names) + "}", len(names))
    with pytest.raises(HeaderError, match="is empty or has control characters") as e:
        parse_header_bytes(blob, size, "f")
    assert e.value.what.startswith(f"tensor name {bad}")


def test_good_names_parse_in_byte_order():
    blob, size = _blob(_entries(["b", "a", "c"]) + "}", 3)
    tensors, meta = parse_header_bytes(blob, size, "f")
    assert list(tensors) == ["b", "a", "c"] and meta == {}
    assert tensors["a"] == TensorInfo("a", "U8", (1,), 8 + len(blob) - 8 + 1, 8 + len(blob) - 8 + 2)


@pytest.mark.parametrize(
    ("weight_map", "what"),
    [
        (
            {"good": "../x.safetensors", "bad\x01": "a.safetensors"},
            "weight_map names an unsafe path '../x.safetensors'",
        ),
        (
            {"bad\x01": "a.safetensors", "good": "../x.safetensors"},
            "weight_map names a tensor 'bad\\x01' that is empty or has control characters",
        ),
        ({"a": "a.safetensors", "b": ["a.safetensors"]}, "weight_map names an unsafe path ['a.safetensors']"),
        ({"a": "a.safetensors", "b": "s3://x/y"}, "weight_map names an unsafe path 's3://x/y'"),
        ({"a": "a.safetensors", "b": ""}, "weight_map names an unsafe path ''"),
    ],
)
def test_the_first_weight_map_problem_is_named(weight_map, what):
    with pytest.raises(HeaderError) as e:
        parse_weight_map(json.dumps({"weight_map": weight_map}).encode(), "index.json")
    assert e.value.what == what


def _info(name: str, start: int) -> TensorInfo:
    return TensorInfo(name, "U8", (1,), start, start + 1)


SHARDS = {"/d/1": {"x": _info("x", 8), "y": _info("y", 9)}, "/d/2": {"z": _info("z", 8), "w": _info("w", 9)}}


def test_tensors_come_in_file_order_whatever_the_shard_order():
    for order in (["1", "2"], ["2", "1"]):
        shards = [(n, f"/d/{n}") for n in order]
        without = collect_tensors(shards, SHARDS.__getitem__, None, "index")
        index = {"w": "2", "x": "1", "y": "1", "z": "2"}
        with_index = collect_tensors(shards, SHARDS.__getitem__, index, "index")
        assert list(with_index) == ["x", "y", "z", "w"]
        assert list(without) == [t for n in order for t in SHARDS[f"/d/{n}"]]
        assert {n: (r.path, r.info) for n, r in with_index.items()} == {
            n: (p, i) for p, infos in SHARDS.items() for n, i in infos.items()
        }


def test_a_shard_keeps_only_what_the_index_places_there():
    got = collect_tensors([("1", "/d/1"), ("2", "/d/2")], SHARDS.__getitem__, {"x": "1", "z": "2", "w": "2"}, "i")
    assert list(got) == ["x", "z", "w"]


def test_a_tensor_in_two_shards_without_an_index_is_refused():
    two = {"/d/1": {"x": _info("x", 8)}, "/d/2": {"y": _info("y", 8), "x": _info("x", 9)}}
    with pytest.raises(HeaderError, match="tensor also present in /d/1") as e:
        collect_tensors([("1", "/d/1"), ("2", "/d/2")], two.__getitem__, None, "i")
    assert (e.value.file, e.value.tensor) == ("/d/2", "x")


def test_the_first_tensor_the_index_misplaces_is_named():
    index = {"x": "1", "q": "2", "y": "1", "r": "1", "z": "2", "w": "2"}
    with pytest.raises(HeaderError, match="the index places this tensor in 2, which lacks it") as e:
        collect_tensors([("1", "/d/1"), ("2", "/d/2")], SHARDS.__getitem__, index, "i")
    assert (e.value.file, e.value.tensor) == ("i", "q")


PART = st.sampled_from(
    [
        "embed_tokens",
        "lm_head",
        "output",
        "weight",
        "bias",
        "final_logits_bias",
        "shared",
        "wte",
        "x",
        "",
        "layers",
        "0",
        "weight\n",
        "bias\n\n",
        "final_logits_bias\n",
    ]
)


@settings(max_examples=500)
@given(st.lists(st.one_of(PART, st.text(alphabet="abe_.dhtwx\n", max_size=6)), max_size=6))
def test_the_vocabulary_names_are_those_the_regex_finds(parts):
    name = ".".join(parts)
    assert is_vocab_name(name) == (VOCAB_TENSOR.search(name) is not None)
