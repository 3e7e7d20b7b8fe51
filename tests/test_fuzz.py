"""Property fuzzing of the parsers: any bytes give a result or a ChatvecError (HeaderError for headers), nothing else."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from chatvec_dist.dtypes import ITEMSIZE
from chatvec_dist.errors import ChatvecError, HeaderError
from chatvec_dist.io.checkpoint import INDEX_NAME, open_checkpoint
from chatvec_dist.io.header import MAX_DIMS, parse_header_bytes

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHARD = "model-00001-of-00001.safetensors"
NAMES = ["a.weight", "b.bias", "c"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
ints = st.integers(-4, 64) | st.integers(-(2**64), 2**64) | st.sampled_from([0, 1, 2**48, 2**63 - 1, 2**64])
dtypes = st.sampled_from(sorted(ITEMSIZE)) | st.sampled_from(["", "F31", "bf16", None, 2, ["F32"], {"F32": 1}])
shapes = st.lists(ints, max_size=MAX_DIMS + 1) | json_values
offsets = st.lists(ints, min_size=0, max_size=3) | json_values
names = st.sampled_from(NAMES) | st.text(max_size=6)


def framed(body: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def check_parse(blob: bytes, file_size: int) -> None:
    """The parser returns a consistent result or raises HeaderError; any other exception fails the test."""
    try:
        tensors, metadata = parse_header_bytes(blob, file_size, "fuzz.safetensors")
    except HeaderError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.safetensors")
        return
    assert isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    (n,) = struct.unpack("<Q", blob[:8])
    cursor = 8 + n
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        assert t.start == cursor and t.nbytes == math.prod(t.shape) * ITEMSIZE[t.dtype]
        cursor = t.end
    assert cursor == file_size


@FUZZ
@given(st.binary(max_size=256), st.integers(0, 1024))
def test_arbitrary_bytes(blob: bytes, extra: int) -> None:
    check_parse(blob, len(blob) + extra if extra % 2 else len(blob))


@FUZZ
@given(st.binary(max_size=256), st.binary(max_size=64), st.integers(-16, 16))
def test_arbitrary_header_body(body: bytes, data: bytes, skew: int) -> None:
    blob = framed(body, data, max(0, len(body) + skew) if skew % 3 == 0 else None)
    check_parse(blob, len(blob))


@FUZZ
@given(json_values, st.binary(max_size=64))
def test_arbitrary_json(doc: object, data: bytes) -> None:
    check_parse(framed(json.dumps(doc).encode(), data), len(framed(json.dumps(doc).encode(), data)))


@st.composite
def hostile_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """JSON headers with random names, dtypes, shapes and offsets, over a data section of random size."""
    doc: dict[str, object] = {}
    if draw(st.booleans()):
        doc["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | json_values)
    for _ in range(draw(st.integers(0, 4))):
        entry = {"dtype": draw(dtypes), "shape": draw(shapes), "data_offsets": draw(offsets)}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(json_values)
        doc[draw(names)] = entry
    data = draw(st.integers(0, 512))
    body = json.dumps(doc).encode()
    blob = framed(body, b"\0" * data)
    return blob, len(blob)


@FUZZ
@given(hostile_headers())
def test_structured_headers(case: tuple[bytes, int]) -> None:
    check_parse(*case)


@st.composite
def near_valid_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid header (contiguous tensors covering the data), then at most one field nudged."""
    doc: dict[str, object] = {}
    cursor = 0
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * ITEMSIZE[dtype]
        doc[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
    data = cursor
    victim = doc[f"t{draw(st.integers(0, len(doc) - 1))}"]
    match draw(st.integers(0, 6)):
        case 0:
            pass  # valid as is
        case 1:
            victim["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-3, 3))
        case 2:
            victim["shape"] = victim["shape"] + [draw(st.integers(-2, 3))]
        case 3:
            victim["dtype"] = draw(dtypes)
        case 4:
            data += draw(st.integers(-3, 3))
        case 5:
            del victim[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        case 6:
            victim["shape"] = [d * draw(st.sampled_from([-1, 2**30])) for d in victim["shape"]]
    body = json.dumps(doc).encode()
    body += b" " * draw(st.integers(0, 7))
    blob = framed(body, b"\1" * max(0, data))
    return blob, len(blob)


@FUZZ
@given(near_valid_headers())
def test_near_valid_headers(case: tuple[bytes, int]) -> None:
    check_parse(*case)


def test_valid_headers_parse() -> None:
    """Sanity: the near-valid generator's unmutated case is accepted (the fuzz is not all rejections)."""
    body = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": None}).encode()
    tensors, meta = parse_header_bytes(framed(body, b"\0" * 8), 8 + len(body) + 8)
    assert list(tensors) == ["a"] and meta == {}


# --- the index, beside a valid shard -----------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz_ckpt")
    save_file({n: torch.zeros(2, 3) for n in NAMES}, d / SHARD)
    (d / "other.txt").write_text("not a shard")
    return d


def check_open(directory: Path) -> None:
    try:
        ckpt = open_checkpoint(directory)
    except ChatvecError as e:
        assert "\n" not in str(e)
        return
    assert set(ckpt.tensors) <= set(NAMES) and ckpt.tensors


index_paths = st.sampled_from(
    [
        SHARD,
        "./" + SHARD,
        "other.txt",
        "missing.safetensors",
        "../" + SHARD,
        "/etc/passwd",
        "sub/" + SHARD,
        ".",
        "",
        "a\\b",
        "x" * 300,
        "a\0b",
        SHARD + "\n",
    ]
) | st.text(max_size=12)
weight_maps = st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), index_paths | json_values, max_size=5)
index_docs = (
    st.fixed_dictionaries({"weight_map": weight_maps}, optional={"metadata": json_values})
    | st.fixed_dictionaries({"weight_map": json_values})
    | json_values
)


@FUZZ
@given(st.binary(max_size=256))
def test_index_random_bytes(ckpt_dir: Path, blob: bytes) -> None:
    (ckpt_dir / INDEX_NAME).write_bytes(blob)
    check_open(ckpt_dir)


@FUZZ
@given(index_docs)
def test_index_random_json(ckpt_dir: Path, doc: object) -> None:
    (ckpt_dir / INDEX_NAME).write_text(json.dumps(doc))
    check_open(ckpt_dir)


@FUZZ
@given(st.binary(max_size=256) | hostile_headers().map(lambda c: c[0]) | near_valid_headers().map(lambda c: c[0]))
def test_shard_random_bytes(tmp_path_factory, blob: bytes) -> None:
    d = tmp_path_factory.getbasetemp() / "fuzz_shard"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(blob)
    try:
        open_checkpoint(d)
    except ChatvecError as e:
        assert "\n" not in str(e)


def _outcome(blob: bytes, file_size: int) -> object:
    """The parse's tensors in order, or its error's message."""
    try:
        return list(parse_header_bytes(blob, file_size, "fuzz.safetensors")[0].items())
    except HeaderError as e:
        return str(e)


@st.composite
def shuffled_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A near-valid header whose entries are listed in another order than their bytes."""
    blob, size = draw(near_valid_headers())
    (n,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8 : 8 + n])
    keys = draw(st.permutations(list(doc)))
    shuffled = framed(json.dumps({k: doc[k] for k in keys}).encode(), blob[8 + n :])
    return shuffled, len(shuffled) + size - len(blob)


@FUZZ
@given(hostile_headers() | near_valid_headers() | shuffled_headers())
def test_bulk_checks_agree_with_entry_by_entry(case: tuple[bytes, int]) -> None:
    """The bulk path (all entries checked in a few C loops) accepts exactly what the entry-by-entry checks accept,
    with the same tensors in the same order; a header it turns down gets the entry-by-entry error."""
    from chatvec_dist.io import header

    bulk = _outcome(*case)
    checked_in_bulk = header._checked_in_bulk
    header._checked_in_bulk = lambda *_: None
    try:
        assert _outcome(*case) == bulk
    finally:
        header._checked_in_bulk = checked_in_bulk


def test_bulk_checks_take_valid_headers_in_any_order() -> None:
    """The bulk path is the one a valid header takes, entries listed in byte order or not (the fuzz above would
    pass with a bulk path that always declines)."""
    from chatvec_dist.io.header import _checked_in_bulk

    doc = {
        "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [8, 20]},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    tensors = _checked_in_bulk(doc, 100, 120)
    assert tensors is not None and [(t.name, t.start, t.end, t.shape) for t in tensors] == [
        ("a", 100, 108, (2,)),
        ("b", 108, 120, (2, 3)),
    ]
    assert _checked_in_bulk(doc, 100, 121) is None  # bytes after the last tensor: entry by entry names it
