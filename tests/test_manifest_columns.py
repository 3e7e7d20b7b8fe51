"""The manifest's table built column by column against a row-by-row reference written here (the rows as chatvec
wrote them before), and its rows checksum: `rows_hash` over a canonical encoding of the values, checked against an
encoder written here from the documented format."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Callable

import pyarrow as pa
import pytest
import xxhash

from chatvec_dist.errors import VerifyError
from chatvec_dist.exec.messages import SegmentResult
from chatvec_dist.kernels.stats import Stats
from chatvec_dist.output.columns_digest import ROWS_ALGORITHM, columns_digest, same_values
from chatvec_dist.output.manifest import SCHEMA, SharedHashes, Tally, rows_digest, rows_hash
from chatvec_dist.output.manifest_columns import layout_columns, measured_digests
from chatvec_dist.planning.layout import layout
from chatvec_dist.planning.planner import PlannedTensor, Src
from chatvec_dist.planning.sparsity import TermDare, TiesPlan
from chatvec_dist.term import Term

BLOCK = 64  # bytes per output hash block; 8 elements per source hash block
ITEM = {"BF16": 2, "F32": 4, "I64": 8, "F8_E4M3": 1}


def planned() -> list[PlannedTensor]:
    """One tensor of each kind a manifest row distinguishes."""
    cp, plus, minus = (Src(f"/m/{n}.safetensors", 8 + i, "BF16") for i, n in enumerate(("cp", "chat", "base")))
    other = Src("/m/vector.safetensors", 16, "F32")
    fused = Src("/m/e0.safetensors", 24, "BF16", segments=(("/m/e0.safetensors", 24, 3), ("/m/e1.safetensors", 8, 3)))
    two = (Term(1.0, plus, minus), Term(0.5, other, None))  # a merged vector, then an applied one
    fp8 = Src("/m/fp8.safetensors", 40, "F8_E4M3", scale=Src("/m/fp8.safetensors", 8, "F32"))  # block-scaled
    return [
        PlannedTensor("merge.weight", "merge", "", (2, 3), "BF16", cp, two, 6),
        PlannedTensor("kept.weight", "copy", "excluded", (3,), "BF16", cp, (), 0),  # copied as stored
        PlannedTensor("cast.weight", "copy", "excluded", (3,), "F32", cp, (), 0),  # copied, converted
        PlannedTensor("ids", "copy", "non-float", (2,), "I64", Src("/m/cp.safetensors", 0, "I64"), (), 0),
        PlannedTensor(
            "embed.weight",
            "merge_rows",
            "vocab:full",
            (4, 2),
            "F32",
            cp,
            two[:1],
            6,
            rows=((3, 1), (0, 2)),
            row_src=plus,
        ),
        PlannedTensor("fp8.weight", "merge", "", (4, 4), "F8_E4M3", fp8, (Term(1.0, fp8, fp8),), 16),
        PlannedTensor("big.weight", "merge", "", (5, 8), "F32", cp, two, 40),  # 3 output blocks, 5 source blocks
        PlannedTensor("experts.weight", "merge", "experts:mapped", (6,), "BF16", cp, (Term(1.0, fused, None),), 6),
        PlannedTensor("ties.weight", "merge", "", (4,), "BF16", cp, two, 4, ties=TiesPlan(0.5, True, 2)),
        PlannedTensor("dare.weight", "merge", "", (4,), "BF16", cp, two, 4, dare=(TermDare(0.5, 1, 2**31), None)),
        PlannedTensor("extract.weight", "merge", "", (2,), "F32", None, (Term(1.0, plus, minus),), 2),
        PlannedTensor("empty.weight", "merge", "", (0,), "BF16", cp, two, 0),
    ]


def stats_of(i: int) -> Stats:
    """Stats that exercise every branch: zero, NaN and ordinary norms, non-finite counts, DARE/TIES shares."""
    cp_sq = [0.0, 4.0, float("nan"), 9.0][i % 4]
    return Stats(cp_sq, 2.0 + i, 1.0 + i, nan=i % 3, inf=i % 2, kept=[i, 1] if i % 2 else [], agree=i, signed=i % 3)


def digest(*key: int) -> bytes:
    return xxhash.xxh3_128_digest(repr(key).encode())


def blocks(n: int, salt: int) -> list[tuple[int, bytes]]:
    return [(b, digest(salt, b)) for b in range(n)]


def source_extents(t: PlannedTensor) -> list[tuple[Src, int]]:
    """CP's elements, each vector's merged ones, each FP8 source's scales (blocks of 128 × 128), each token row's
    chat row."""
    vectors = [s for _, p, m in t.terms for s in (p, m) if s is not None]
    own = ([(t.cp, t.numel)] if t.cp is not None else []) + [(s, t.merge_elems) for s in vectors]
    cols = t.shape[-1]
    scales = [(s.scale, -(-n // cols // 128) * -(-cols // 128)) for s, n in own if s.scale is not None]
    width = t.numel // t.shape[0] if t.rows else 0
    rows = [
        (Src(t.row_src.path, t.row_src.start + chat * width * ITEM[t.row_src.dtype], t.row_src.dtype), width)
        for _, chat in t.rows
    ]
    return own + scales + rows


def source_roles(t: PlannedTensor) -> list[str]:
    roles = (["cp"] if t.cp is not None else []) + [
        r for n, (_, _, m) in enumerate(t.terms) for r in [f"chat[{n}]"] + ([f"base[{n}]"] if m else [])
    ]
    own = ([t.cp] if t.cp is not None else []) + [s for _, p, m in t.terms for s in (p, m) if s is not None]
    scaled = [f"{role}.scale" for role, src in zip(roles, own) if src.scale is not None]
    return roles + scaled + [f"chat[0].row[{chat}]" for _, chat in t.rows]


def plain_stats(i: int) -> Stats:
    """`stats_of` in a job without DARE or TIES: nothing kept."""
    return dataclasses.replace(stats_of(i), kept=[])


def feed(
    tally: Tally, ts: list[PlannedTensor], stats_at: Callable[[int], Stats] = stats_of
) -> dict[int, tuple[list, list[list], list[Stats]]]:
    """Report every tensor in two pieces where it has several blocks (the second first, then both again, as a
    unit redone): return what was reported, per tensor (output blocks, each source's blocks, stats per piece)."""
    sent = {}
    for i, t in enumerate(ts):
        out = blocks(max(1, -(-t.numel * ITEM[t.out_dtype] // BLOCK)), i)
        srcs = [blocks(max(1, -(-n // 8)), 100 * i + k) for k, (_, n) in enumerate(source_extents(t))]
        cut = (len(out) + 1) // 2
        pieces = [(out[:cut], [s[: 2 * cut] for s in srcs]), (out[cut:], [s[2 * cut :] for s in srcs])]
        pieces = [p for p in pieces if p[0]]
        stats = [stats_at(i + k) for k in range(len(pieces))]
        for k in [*reversed(range(len(pieces))), *range(len(pieces))]:
            seg = SegmentResult(0, i, tuple(pieces[k][0]), stats[k], tuple(map(tuple, pieces[k][1])))
            tally.add(seg, f"w{k}", f"n{k}", 0.25)
        sent[i] = (out, srcs, stats)
    return sent


def folded(digests: list[tuple[int, bytes]]) -> str:
    return xxhash.xxh3_128_hexdigest(b"".join(d for _, d in digests))


def reference_rows(lay, sent, target: str) -> list[dict]:
    """The rows as chatvec built them row by row before the columns (the measured values from `sent`)."""
    rows = []
    for i, placed in enumerate(lay.tensors):
        t = placed.tensor
        out, srcs, stats = sent[i]
        s = Stats()
        for piece in stats:
            s.add(piece)
        if len(stats) == 1:
            s = stats[0]
        measured = t.cp is None or t.rule != "copy" or t.cp.dtype != t.out_dtype or bool(t.rows)
        changed = bool(t.terms or t.rows)
        cp_norm = math.sqrt(s.cp_sq) if measured and t.cp is not None else None
        sources = []
        for role, (src, extent), digests in zip(source_roles(t), source_extents(t), srcs, strict=True):
            segments = None
            if src.segments:
                segments, at = [], 0
                for path, start, numel in src.segments:
                    take = max(0, min(extent, at + numel) - at)
                    if take:
                        segments.append(dict(file=path, offset=start, nbytes=take * ITEM[src.dtype]))
                    at += numel
            sources.append(
                dict(
                    role=role,
                    file=src.path,
                    offset=src.start,
                    nbytes=extent * ITEM[src.dtype],
                    dtype=src.dtype,
                    hash=folded(digests),
                    segments=segments,
                )
            )
        rows.append(
            {
                "target": target,
                "tensor": t.name,
                "rule": t.rule,
                "reason": t.reason,
                "shape": list(t.shape),
                "dtype_out": t.out_dtype,
                "dtype_cp": t.cp.dtype if t.cp else None,
                "dtypes_vector": [src.dtype for src in t.vector_srcs],
                "shard": lay.shards[placed.shard].name,
                "offset": placed.offset,
                "nbytes": placed.nbytes,
                "hash": folded(out),
                "cp_norm": cp_norm,
                "delta_norm": math.sqrt(s.delta_sq) if t.terms else None,
                "rel_update": (math.sqrt(s.update_sq) / cp_norm if cp_norm else None) if changed else None,
                "nan_count": s.nan if t.out_dtype != "I64" else None,  # every float dtype counted
                "inf_count": s.inf if t.out_dtype != "I64" else None,
                "worker": ",".join(f"w{k}" for k in range(len(stats))),
                "node": ",".join(f"n{k}" for k in range(len(stats))),
                "seconds": 0.25 * len(stats),
                "alphas": [float(term.alpha) for term in t.terms] if t.terms else None,
                "token_rows": len(t.rows),
                "source_digests": sources,
                "density": [k / t.merge_elems for k in s.kept] if s.kept and t.merge_elems else None,
                "sign_agreement": (s.agree / s.signed if s.signed else None) if t.ties is not None else None,
            }
        )
    return rows


def test_the_columns_hold_the_rows_built_one_by_one():
    ts = planned()
    lay = layout(ts, max_shard_size=200)  # several shards
    assert len(lay.shards) > 1
    tally = Tally(lay, BLOCK)
    sent = feed(tally, ts)
    table = tally.table("t", {"recipe": "r"})
    want = reference_rows(lay, sent, "t")
    assert table.schema.remove_metadata() == SCHEMA
    got = table.to_pylist()
    assert json.dumps(got, default=str) == json.dumps(want, default=str)  # NaN as NaN, in the same order
    assert rows_digest(table.replace_schema_metadata(None)) == rows_digest(pa.Table.from_pylist(want, schema=SCHEMA))
    meta = json.loads(table.schema.metadata[b"chatvec"])
    assert meta["rows_hash"] == {"algorithm": ROWS_ALGORITHM, "sha256": columns_digest(table)}
    assert "rows_sha256" not in meta and meta["recipe"] == "r"


def test_a_job_without_dare_or_ties_has_null_shares_as_built_one_by_one():
    ts = [dataclasses.replace(t, dare=(), ties=None) for t in planned()]
    lay = layout(ts, max_shard_size=200)
    tally = Tally(lay, BLOCK)
    sent = feed(tally, ts, plain_stats)
    table = tally.table("t", {})
    got = table.to_pylist()
    assert json.dumps(got, default=str) == json.dumps(reference_rows(lay, sent, "t"), default=str)
    assert all(row["density"] is None and row["sign_agreement"] is None for row in got)
    assert json.loads(table.schema.metadata[b"chatvec"])["rows_hash"]["sha256"] == columns_digest(table)


def test_outputs_reporting_the_same_source_hash_objects_share_one_source_digests_column():
    """A batch's outputs get the very same source-hash tuples for the sources they share (one `shared` per unit's
    result): the second output takes the first's column; equal tuples that are other objects make their own."""
    ts = [t for t in planned() if t.numel <= BLOCK // 8]  # one block of each source: complete with one segment
    assert len(ts) > 5 and any(len(source_extents(t)) > 1 for t in ts)
    lay = layout(ts, max_shard_size=10**6)
    segments = [
        SegmentResult(0, i, ((0, digest(i)),), stats_of(i), tuple(((0, digest(i, k)),) for k in range(len(e))))
        for i, e in enumerate(map(source_extents, ts))
    ]
    shared = SharedHashes()
    first, second, other = Tally(lay, BLOCK), Tally(lay, BLOCK), Tally(lay, BLOCK)
    for tally, share in ((first, shared), (second, shared), (other, SharedHashes())):
        tally.add_all(segments, "w0", "n0", 0.25, share)  # as `feed` reports them
    fixed = layout_columns(lay)
    column = fixed.source_digests(first.totals.source_hashes.tolist())
    assert fixed.source_digests(second.totals.source_hashes.tolist()) is column
    assert fixed.source_digests(other.totals.source_hashes.tolist()) is not column
    assert fixed.source_digests(other.totals.source_hashes.tolist()).equals(column)
    want = [row["source_digests"] for row in first.table("a", {}).to_pylist()]
    for tally, name in ((first, "a"), (second, "b"), (other, "c"), (second, "b")):
        table = tally.table(name, {})
        assert [row["source_digests"] for row in table.to_pylist()] == want
        assert json.loads(table.schema.metadata[b"chatvec"])["rows_hash"]["sha256"] == columns_digest(table)
    changed = Tally(lay, BLOCK)  # other sources' bytes, after the first output's column was made
    changed.add_all(
        [s._replace(sources=tuple(((0, digest(7, *b[0])),) for b in s.sources)) for s in segments],
        "w0",
        "n0",
        0.25,
    )
    first.table("a", {})
    table = changed.table("d", {})
    assert [row["source_digests"] for row in table.to_pylist()] != want
    assert json.loads(table.schema.metadata[b"chatvec"])["rows_hash"]["sha256"] == columns_digest(table)
    sent = {i: ([(0, digest(i))], [list(b) for b in s.sources], [s.stats]) for i, s in enumerate(segments)}
    assert json.dumps(first.table("a", {}).to_pylist(), default=str) == json.dumps(
        reference_rows(lay, sent, "a"), default=str
    )


def test_outputs_sharing_a_layout_share_its_columns_and_an_incomplete_tensor_is_an_error():
    ts = planned()
    lay = layout(ts, max_shard_size=10**6)
    assert layout_columns(lay) is layout_columns(lay)
    again = layout(ts, max_shard_size=10**6)  # equal, another object: its own
    assert layout_columns(again) is not layout_columns(lay)
    first, second = Tally(lay, BLOCK), Tally(lay, BLOCK)
    feed(first, ts)
    feed(second, ts)
    a, b = (tally.table(name, {}).drop_columns(["target"]) for tally, name in ((first, "a"), (second, "b")))
    assert columns_digest(a) == columns_digest(b)  # NaN norms included
    third = Tally(lay, BLOCK)
    sent = feed(third, ts[:-1])  # the last tensor never reported
    assert len(sent) == len(ts) - 1
    with pytest.raises(VerifyError, match="internal: not all of its blocks were reported in full") as e:
        third.table("c", {})
    assert "empty.weight" in str(e.value)


# --- the canonical encoding, written from its documentation ---------------------------------------------------


def le(n: int) -> bytes:
    return struct.pack("<q", n)


def encode(values: list, kind: pa.DataType) -> bytes:
    """The documented encoding of a column, in plain Python."""
    out = bytes(v is not None for v in values)
    if kind == pa.int64():
        return out + b"".join(le(v or 0) for v in values)
    if kind == pa.float64():
        canon = [0.0 if v is None else v for v in values]
        return out + b"".join(
            struct.pack("<d", v) if not math.isnan(v) else bytes.fromhex("000000000000f87f") for v in canon
        )
    if kind == pa.string():
        data = [(v or "").encode() for v in values]
        return out + b"".join(le(len(d)) for d in data) + b"".join(data)
    if pa.types.is_list(kind):
        items = [x for v in values if v is not None for x in v]
        return out + b"".join(le(len(v or [])) for v in values) + encode(items, kind.value_type)
    assert pa.types.is_struct(kind)
    fields = [encode([None if v is None else v[f.name] for v in values], f.type) for f in kind]
    return out + b"".join(fields)


def reference_digest(table: pa.Table) -> str:
    h = hashlib.sha256(le(table.num_rows))
    for field in table.schema:
        name = field.name.encode()
        h.update(
            le(len(name)) + name + hashlib.sha256(encode(table.column(field.name).to_pylist(), field.type)).digest()
        )
    return h.hexdigest()


def test_the_rows_checksum_is_the_documented_encoding_whatever_the_chunks():
    ts = planned()
    lay = layout(ts, max_shard_size=200)
    tally = Tally(lay, BLOCK)
    feed(tally, ts)
    table = tally.table("t", {}).replace_schema_metadata(None)
    assert columns_digest(table) == reference_digest(table)
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=3))
    assert chunked.column(0).num_chunks > 1 and columns_digest(chunked) == columns_digest(table)
    sliced = pa.concat_tables([table.slice(0, 4), table.slice(4)])
    assert columns_digest(sliced) == columns_digest(table)


@pytest.mark.parametrize(
    "one, other, kind",
    [
        (["ab", "c"], ["a", "bc"], pa.string()),
        ([None], [""], pa.string()),
        ([None], [0], pa.int64()),
        ([0.0], [-0.0], pa.float64()),
        ([[1], [2, 3]], [[1, 2], [3]], pa.list_(pa.int64())),
        ([None, [1]], [[], [1]], pa.list_(pa.int64())),
        (
            [[{"a": "x", "b": None}]],
            [[{"a": "x", "b": ""}]],
            pa.list_(pa.struct([("a", pa.string()), ("b", pa.string())])),
        ),
    ],
)
def test_different_values_never_share_a_checksum(one, other, kind):
    first, second = (pa.table({"c": pa.array(v, kind)}) for v in (one, other))
    assert columns_digest(first) != columns_digest(second)
    assert columns_digest(first) == reference_digest(first)
    assert columns_digest(second) == reference_digest(second)


def test_every_nan_is_one_and_the_checksum_is_pinned():
    """Any NaN payload encodes as the one quiet NaN; and the value of a small table is pinned, so that a change of
    the encoding (or of what a pyarrow version gives back) cannot pass unnoticed."""
    payload = struct.unpack("<d", bytes.fromhex("010000000000f87f"))[0]
    assert columns_digest(pa.table({"x": [payload]})) == columns_digest(pa.table({"x": [float("nan")]}))
    table = pa.table(
        {
            "s": pa.array(["a", None, "é"]),
            "i": pa.array([1, None, -2], pa.int64()),
            "l": pa.array([[1.5], None, []], pa.list_(pa.float64())),
        }
    )
    assert columns_digest(table) == reference_digest(table)
    assert columns_digest(table) == "648127d380853bb7aa2c2635de710209660c84563f2ad7f16d2adca57fb12dae"
    assert rows_hash(table) == {"algorithm": ROWS_ALGORITHM, "sha256": columns_digest(table)}


def test_outputs_sharing_source_digests_objects_tally_as_each_alone():
    """A batch's outputs report the very same source digests objects (exec/small_runs.py): tallied with the source
    hashes shared across the outputs of a unit (`add_all`), each table equals the output's tallied segment by
    segment; an output whose sources are other objects (other digests) gets its own."""
    ts = planned()
    lay = layout(ts, max_shard_size=10**6)
    segments: list[list[SegmentResult]] = [[], [], []]
    for i, t in enumerate(ts):
        for o, salt in enumerate((100, 100, 7000)):  # outputs 0 and 1: the same objects; 2: others
            if o != 1:
                srcs = tuple(
                    tuple(blocks(max(1, -(-n // 8)), salt * i + k)) for k, (_, n) in enumerate(source_extents(t))
                )
            out = tuple(blocks(max(1, -(-t.numel * ITEM[t.out_dtype] // BLOCK)), 1000 * o + i))
            segments[o].append(SegmentResult(o, i, out, stats_of(i + o), srcs))
    shared = SharedHashes()
    tables = []
    for segs in segments:
        together, alone = Tally(lay, BLOCK), Tally(lay, BLOCK)
        together.add_all(segs, "w", "n", 0.5, shared)
        for seg in segs:
            alone.add(seg, "w", "n", 0.5)
        tables.append(together.table("t", {}))
        assert repr(tables[-1].to_pylist()) == repr(alone.table("t", {}).to_pylist())  # NaN norms: as NaN
    assert shared and tables[0].column("source_digests") == tables[1].column("source_digests")
    assert tables[0].column("source_digests") != tables[2].column("source_digests")


def test_a_source_reported_without_its_block_is_an_error_not_a_row():
    ts = planned()[:1]  # one block of output and of each of its three sources
    tally = Tally(layout(ts, max_shard_size=10**6), BLOCK)
    sources = (blocks(1, 1), (), blocks(1, 3))  # the second source's block missing
    tally.add(SegmentResult(0, 0, tuple(blocks(1, 0)), Stats(), tuple(map(tuple, sources))), "w", "n", 0.1)
    with pytest.raises(VerifyError, match="internal: 2 of its 4 sources reported in full"):
        tally.table("t", {})


def test_source_hashes_are_taken_as_complete_only_where_they_are_the_very_tuples_of_a_column_made():
    """A second output reporting the very source hash tuples of a column made (checked complete then) is not checked
    again; an equal list holding one other tuple with a source missing is, and names its tensor."""
    ts = planned()
    lay = layout(ts, max_shard_size=10**6)
    first, second = Tally(lay, BLOCK), Tally(lay, BLOCK)
    feed(first, ts)
    feed(second, ts)
    want = first.table("a", {})
    mine, theirs = second.totals.source_hashes, first.totals.source_hashes
    mine[:] = theirs  # the very tuples
    assert second.table("b", {}).column("source_digests") is not None
    assert layout_columns(lay).made_of(mine.tolist())
    at = next(i for i, found in enumerate(theirs) if len(found) > 1)
    mine[at] = (None, *theirs[at][1:])
    assert not layout_columns(lay).made_of(mine.tolist())
    with pytest.raises(VerifyError, match=f"internal: {len(want.column('source_digests')[at]) - 1} of its"):
        second.table("b", {})
    mine[at] = theirs[at]
    second.totals.hashes[0] = None  # the tuples are the column's again, a tensor's own blocks missing
    with pytest.raises(VerifyError, match="internal: not all of its blocks were reported in full"):
        second.table("b", {})


def _float_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


SAME_VALUES_CASES = [  # (a, b, type, exactly the same values)
    ([1.0, None, 2.5], [1.0, None, 2.5], pa.float64(), True),
    ([0.0, 1.0], [-0.0, 1.0], pa.float64(), False),  # equal as numbers, not as values
    ([float("nan")], [float("nan")], pa.float64(), True),
    ([float("nan")], [_float_bits(0x7FF0000000000001)], pa.float64(), False),  # another NaN: encoded alike, made anew
    ([1.0, None], [None, 1.0], pa.float64(), False),
    ([1.0, 2.0], [1.0, 2.0, 3.0], pa.float64(), False),
    ([1, None, 3], [1, None, 3], pa.int64(), True),
    ([1, 2], [1, 3], pa.int64(), False),
    (["w", "", None], ["w", "", None], pa.string(), True),
    (["w", ""], ["w", None], pa.string(), False),
    ([None, None], [None, None], pa.list_(pa.float64()), True),  # all null: one encoding
    ([None, None], [None, None, None], pa.list_(pa.float64()), False),
    ([[1.0], None], [[1.0], None], pa.list_(pa.float64()), False),  # a list with values: never taken
]


@pytest.mark.parametrize("a, b, kind, same", SAME_VALUES_CASES)
def test_a_measured_columns_digest_is_the_last_ones_only_for_exactly_its_values(a, b, kind, same):
    """`same_values` holds only where the encodings (written here) are one; `measured_digests` gives each column the
    digest of its own encoding, the last manifest's column's or not."""
    first, second = pa.array(a, kind), pa.array(b, kind)
    assert same_values(first, second) is same
    assert not same or encode(a, kind) == encode(b, kind)  # taken only where the encoding is one
    assert same_values(pa.array([1.0]), pa.array([1], pa.int64())) is False
    for column, values in ((first, a), (second, b)):
        got = measured_digests({"x": column})["x"]
        assert got == hashlib.sha256(encode(values, kind)).digest()
