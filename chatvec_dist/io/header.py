"""Safetensors headers: parsed by hand (8-byte length + JSON) with every bound checked, and written."""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import struct
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter, itemgetter

from ..dtypes import ITEMSIZE
from ..errors import ChatvecError, HeaderError
from ..quickinit import maker, quick_init
from .ranges import open_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself applies
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 48
MAX_DIM = (1 << 63) - 1  # every dimension must fit an int64 (the manifest's, torch's and numpy's shapes)


@quick_init
@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a safetensors file; `start`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


_make_info = maker(TensorInfo)  # header entries by the hundred thousand


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    fast = dict(pairs)  # one C call per JSON object; the loop below only names the duplicate
    if len(fast) == len(pairs):
        return fast
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError(f"duplicate key {shown(key)} in the JSON header")
        seen[key] = value
    return seen


def loads_unique(text: str) -> object:
    """`text` parsed as JSON, refusing a duplicate key in any object (HeaderError): parsed without a hook where
    `_keys_unique` proves there is none (a header's 136 k objects, each a call of the hook: a third of its cost),
    else again with the hook, which raises what it always did (the duplicate, or the same JSON error)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        pass
    else:
        if _keys_unique(text, doc):
            return doc
    return json.loads(text, object_pairs_hook=reject_duplicate_keys)


def _keys_unique(text: str, doc: object) -> bool:
    """Whether `doc`, parsed from `text`, kept every key-value pair of `text`; False also where this cannot tell.
    It tells for an object of objects (a header, an index) where `text` has no escape, each string kept reading as
    in `text`: `text`'s colons, but those in the outer keys and in `__metadata__`, number `doc`'s keys at both
    levels only if no pair was dropped, nor any kept (deeper, or in a string) that was not counted."""
    if type(doc) is not dict or "\\" in text:
        return False
    outer = doc.values()
    if set(map(type, outer)) - {dict}:
        return False
    meta = doc.get("__metadata__", {})
    counted = "".join(chain(doc, (s for s in chain(meta, meta.values()) if type(s) is str)))
    return text.count(":") - counted.count(":") == len(doc) + sum(map(len, outer))


def parse_header_bytes(
    blob: bytes, file_size: int, path: str = "<bytes>"
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a header given its first bytes and the file's size; return (tensors, metadata)."""
    if file_size < 8 or len(blob) < 8:
        raise HeaderError("file is shorter than the 8-byte header length", file=path)
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap", file=path)
    if 8 + n > file_size:
        raise HeaderError(f"header length {n} runs past the end of the file ({file_size} bytes)", file=path)
    if len(blob) < 8 + n:
        raise HeaderError("header is truncated", file=path)
    raw = _json_object(blob[8 : 8 + n], path)
    metadata = raw.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ must map strings to strings", file=path)
    if not all_safe_names(raw):
        name = next(n for n in raw if not is_safe_name(n))
        raise HeaderError(f"tensor name {shown(name)} is empty or has control characters", file=path)
    data_start = 8 + n
    tensors = _checked_in_bulk(raw, data_start, file_size)
    if tensors is None:  # something is wrong: entry by entry, to name the first bad one
        tensors = [_entry(name, spec, data_start, file_size - data_start, path) for name, spec in raw.items()]
        _check_contiguous(tensors, data_start, file_size, path)
    return {t.name: t for t in tensors}, metadata


def _checked_in_bulk(raw: dict, data_start: int, file_size: int) -> list[TensorInfo] | None:
    """Every entry as a TensorInfo in byte order, if every check of `_entry` and `_check_contiguous` passes, made
    in a few C loops over all entries (a 45 k-tensor checkpoint has 136 k of them across its three checkpoints);
    None if any fails, or the header has what the bulk checks leave to `_entry` (a zero dimension)."""
    columns = _typed_columns(list(raw.values()))
    if columns is None:
        return None
    dtypes, shapes, starts, ends = columns
    numel = list(map(math.prod, shapes))
    if numel and max(numel) > MAX_ELEMENTS:
        return None
    if list(map(operator.sub, ends, starts)) != list(map(operator.mul, numel, map(ITEMSIZE.__getitem__, dtypes))):
        return None  # also rules out an end before its start: no tensor has fewer than one element
    names = list(raw)
    spans = list(zip(starts, ends))
    if not all(map(operator.le, spans, spans[1:])):  # in byte order, as `_check_contiguous` sorts them
        order = sorted(range(len(spans)), key=spans.__getitem__)
        names, dtypes, shapes = [names[i] for i in order], [dtypes[i] for i in order], [shapes[i] for i in order]
        starts, ends = [starts[i] for i in order], [ends[i] for i in order]
    if starts[:1] != [0] * bool(starts) or starts[1:] != ends[:-1] or data_start + sum(ends[-1:]) != file_size:
        return None  # a gap, an overlap, or bytes after the last tensor
    at = functools.partial(operator.add, data_start)
    return list(map(_make_info, names, dtypes, map(tuple, shapes), map(at, starts), map(at, ends)))


def _typed_columns(specs: list) -> tuple[list[str], list[list[int]], list[int], list[int]] | None:
    """The entries' dtypes, shapes, starts and ends, if every entry is an object with a known dtype, a shape of at
    most MAX_DIMS dimensions from 1 to MAX_DIM and two integer data offsets; else None."""
    if set(map(type, specs)) - {dict}:
        return None
    try:
        dtypes = list(map(itemgetter("dtype"), specs))
        shapes = list(map(itemgetter("shape"), specs))
        offsets = list(map(itemgetter("data_offsets"), specs))
    except KeyError:
        return None
    if set(map(type, dtypes)) - {str} or not set(dtypes) <= ITEMSIZE.keys():
        return None
    if set(map(type, shapes)) - {list} or set(map(type, offsets)) - {list} or set(map(len, offsets)) - {2}:
        return None
    dims = list(chain.from_iterable(shapes))
    bounds = list(chain.from_iterable(offsets))
    if set(map(type, dims)) - {int} or set(map(type, bounds)) - {int}:  # bools are not ints here
        return None
    if dims and (min(dims) < 1 or max(dims) > MAX_DIM) or specs and max(map(len, shapes)) > MAX_DIMS:
        return None
    return dtypes, shapes, bounds[0::2], bounds[1::2]


def all_safe_names(names: dict[str, object]) -> bool:
    """`is_safe_name` of every key, in a few C loops (JSON keys are strings; an empty one is looked up)."""
    return not names or ("" not in names and max(map(len, names)) <= 1024 and "".join(names).isprintable())


def _json_object(text: bytes, path: str) -> dict:
    """The header's JSON, which must be an object without duplicate keys."""
    try:
        raw = loads_unique(text.decode("utf-8"))
    except HeaderError as e:
        raise HeaderError(e.what, file=path) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"header is not valid JSON ({type(e).__name__})", file=path) from None
    if not isinstance(raw, dict):
        raise HeaderError("header is not a JSON object", file=path)
    return raw


def _check_contiguous(tensors: list[TensorInfo], data_start: int, file_size: int, path: str) -> None:
    """Tensor data must tile the data section: no overlap, no gap, nothing after the last tensor (sorts `tensors`)."""
    tensors.sort(key=attrgetter("start", "end"))
    cursor = data_start
    for t in tensors:
        if t.start != cursor:
            gap = "overlaps the previous tensor" if t.start < cursor else "leaves a gap after the previous tensor"
            raise HeaderError(
                f"data {gap} (starts at {t.start - data_start}, expected {cursor - data_start})",
                file=path,
                tensor=t.name,
            )
        cursor = t.end
    if cursor != file_size:
        raise HeaderError(f"tensor data ends at byte {cursor} but the file has {file_size} bytes", file=path)


def _entry(name: str, spec: object, data_start: int, data_size: int, path: str) -> TensorInfo:
    if type(spec) is not dict:
        raise HeaderError("entry is not an object", file=path, tensor=name)
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if type(dtype) is not str or dtype not in ITEMSIZE:  # an unhashable dtype must not raise TypeError
        raise HeaderError(f"unknown dtype {shown(dtype)}", file=path, tensor=name)
    problem = _shape_problem(shape) if isinstance(shape, list) else "invalid"
    if problem or not isinstance(shape, list):
        raise HeaderError(f"{problem} shape {shown(shape)}", file=path, tensor=name)
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
        raise HeaderError(f"invalid data_offsets {shown(offsets)}", file=path, tensor=name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise HeaderError(f"data_offsets {shown(offsets)} are not ordered", file=path, tensor=name)
    if end > data_size:
        raise HeaderError(
            f"data_offsets {shown(offsets)} run past the end of the file (data section has {data_size} bytes)",
            file=path,
            tensor=name,
        )
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise HeaderError(
            f"holds {end - begin} bytes but shape {shown(shape)} of {dtype} needs {shown(expected)}",
            file=path,
            tensor=name,
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _shape_problem(shape: list) -> str:
    """'invalid' unless a list of at most MAX_DIMS non-negative ints (not bools); 'absurd' unless every dimension
    fits an int64 and the product of the nonzero ones stays within MAX_ELEMENTS, checked one dimension at a time
    (never a huge product): a zero-element [0, 2**63] would otherwise pass, and a loader's strides of
    [0, 2**40, 2**40] overflow; else ''. One loop: planning a 45 k-tensor checkpoint checks 136 k shapes."""
    if len(shape) > MAX_DIMS:
        return "invalid"
    extent, absurd = 1, False
    for d in shape:
        if type(d) is not int or d < 0:
            return "invalid"
        if not absurd:
            extent *= d or 1
            absurd = d > MAX_DIM or extent > MAX_ELEMENTS
    return "absurd" if absurd else ""


def is_safe_name(name: object) -> bool:
    """A tensor name that can be printed on one line: a non-empty string of printable characters."""
    return isinstance(name, str) and 0 < len(name) <= 1024 and name.isprintable()


def shown(value: object, limit: int = 80) -> str:
    """A one-line, bounded repr of a hostile value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and check the header of one safetensors file, touching no tensor bytes."""
    path = str(path)
    try:
        fd = open_regular(path)
    except ChatvecError as e:
        raise HeaderError(e.what, file=path) from None
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    head += f.read(n)
    except OSError as e:
        raise HeaderError(f"cannot read: {e.strerror}", file=path) from None
    return parse_header_bytes(head, size, path)


@quick_init
@dataclass(frozen=True, slots=True)
class OutEntry:
    """A tensor as laid out in an output shard (offsets relative to the data section)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def encode_header(entries: list[OutEntry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a shard, padded with spaces to 8-byte alignment."""
    body = (_formatted(entries, metadata) or _dumped(entries, metadata)).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def _dumped(entries: list[OutEntry], metadata: dict[str, str]) -> str:
    """The header's JSON, by `json.dumps`."""
    doc: dict[str, object] = {"__metadata__": metadata}
    for e in entries:
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    return json.dumps(doc, separators=(",", ":"))


def _formatted(entries: list[OutEntry], metadata: dict[str, str]) -> str | None:
    """`_dumped`'s text, formatted at a third of its cost (a 45 k-tensor shard), where no string needs an escape,
    every number is an int and every name is a distinct tensor's; else None."""
    names = list(map(attrgetter("name"), entries))
    texts = "".join(names) + "".join(set(map(attrgetter("dtype"), entries)))
    if not texts.isascii() or not texts.isprintable() or '"' in texts or "\\" in texts:
        return None
    shapes = list(map(attrgetter("shape"), entries))
    numbers = chain(chain.from_iterable(shapes), map(attrgetter("begin"), entries), map(attrgetter("end"), entries))
    if set(map(type, numbers)) - {int} or len(set(names)) != len(names) or "__metadata__" in names:
        return None
    dims = {shape: ",".join(map(str, shape)) for shape in set(shapes)}  # a model has few distinct shapes
    items = [json.dumps({"__metadata__": metadata}, separators=(",", ":"))[1:-1]]
    items += [
        f'"{e.name}":{{"dtype":"{e.dtype}","shape":[{dims[shape]}],"data_offsets":[{e.begin},{e.end}]}}'
        for e, shape in zip(entries, shapes)
    ]
    return "{" + ",".join(items) + "}"
