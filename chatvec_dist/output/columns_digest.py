"""The manifest's rows checksum (`rows_hash`): sha256 over each column's values in a canonical encoding that no
Arrow or Parquet version changes (the values, never Arrow's buffers or a file's bytes), column by column in C.

The encoding of a column of n values (the schema fixes each column's type, so it decodes back unambiguously):
a validity byte per value (1: a value, 0: null), then by type, nulls counted as zero or empty:
- int64 and float64: each value as 8 bytes little-endian (every NaN as the one quiet NaN 0x7ff8000000000000);
- string: each value's UTF-8 length as 8 bytes little-endian, then every value's UTF-8 bytes end to end;
- list: each list's length as 8 bytes little-endian, then the encoding of all their items as one column;
- struct: the encoding of each field (in schema order) as one column, null where the struct is.
The checksum is the sha256 of the row count (8 bytes little-endian), then for each column its name's UTF-8
length (8 bytes little-endian), its name, and the sha256 of its encoding."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROWS_ALGORITHM = (
    "columns-sha256-1: sha256 of the row count, then of each column its name and the sha256 of its values' "
    "canonical encoding (docs/manifest.md)"
)

Feed = Callable[[bytes], object]


def columns_digest(table: pa.Table, known: Mapping[str, bytes] | None = None) -> str:
    """The rows checksum of `table` (hex): the same for the same values, however chunked or stored. `known`: the
    column_digest of some of its columns, by name, as made from the very arrays the table holds (shared by the
    outputs of a batch)."""
    digest = hashlib.sha256(_le(table.num_rows))
    known = known or {}
    for name, column in zip(table.column_names, table.columns):
        part = known.get(name) or column_digest(column)
        label = name.encode()
        digest.update(_le(len(label)) + label + part)
    return digest.hexdigest()


def column_digest(column: pa.Array | pa.ChunkedArray) -> bytes:
    """The sha256 of a column's encoding."""
    part = hashlib.sha256()
    encode(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, part.update)
    return part.digest()


def same_values(a: pa.Array, b: pa.Array) -> bool:
    """Whether two columns hold exactly the same values, so have one column_digest: of one type and length, and all
    null, or int64 or string columns equal, or float64 ones equal bit for bit (-0.0 is not 0.0). Any other: False."""
    if a.type != b.type or len(a) != len(b) or a.null_count != b.null_count:
        return False
    if a.null_count == len(a):
        return True  # nulls only: encoded as zeros or empty lists, whatever the type
    if pa.types.is_float64(a.type):
        return a.view(pa.int64()).equals(b.view(pa.int64()))  # the valid values' bits
    return (pa.types.is_int64(a.type) or pa.types.is_string(a.type)) and a.equals(b)


def encoding_head(offsets: pa.Array, fields: list[pa.Array]) -> hashlib._Hash:
    """A sha256 fed with the start of the encoding of a list<struct> column without nulls (at either level), of
    lists at `offsets`, whose struct's first fields are `fields`: `resumed` with its later fields, it is that
    column's column_digest."""
    head = hashlib.sha256()
    names = [str(i) for i in range(len(fields))]  # the encoding has no names
    encode(pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(fields, names=names)), head.update)
    return head


def resumed(head: hashlib._Hash, fields: list[pa.Array]) -> bytes:
    """The column_digest of a column whose encoding starts as `head`'s (encoding_head) and ends with `fields`'."""
    part = head.copy()
    for field in fields:
        encode(field, part.update)
    return part.digest()


def encode(array: pa.Array, feed: Feed) -> None:
    """Feed the canonical encoding of `array` (see the module's docstring)."""
    kind = array.type
    feed(np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=np.uint8).tobytes())
    if pa.types.is_int64(kind):
        feed(_ints(pc.fill_null(array, 0)))
    elif pa.types.is_float64(kind):
        values = pc.fill_null(array, 0.0).to_numpy(zero_copy_only=False)
        feed(np.where(np.isnan(values), np.nan, values).astype("<f8").tobytes())
    elif pa.types.is_string(kind):
        filled = pc.fill_null(array, "")
        feed(_ints(pc.binary_length(filled)))
        whole = pa.ListArray.from_arrays(pa.array([0, len(filled)], pa.int32()), filled)
        feed(pc.binary_join(whole, "")[0].as_buffer().to_pybytes())
    elif pa.types.is_list(kind):
        feed(_ints(pc.fill_null(pc.list_value_length(array), 0)))
        encode(array.flatten(), feed)
    elif pa.types.is_struct(kind):
        for field in array.flatten():  # each field with the struct's nulls merged in
            encode(field, feed)
    else:
        raise TypeError(f"no canonical encoding for {kind}")


def _ints(array: pa.Array) -> bytes:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype="<i8").tobytes()


def _le(n: int) -> bytes:
    return n.to_bytes(8, "little")
