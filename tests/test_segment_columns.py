"""A unit's result gathered once per output as columns (output/segment_columns.py) for the tally (per-field arrays,
output/totals.py) and the journal: the journal's bytes and the manifest's rows are those written out field by
field in each test."""

from __future__ import annotations

import math

import msgpack
import xxhash
from test_journal import units

from chatvec_dist.exec.messages import SegmentResult
from chatvec_dist.kernels.stats import Stats
from chatvec_dist.output.journal import HEAD, MAGIC, Journal
from chatvec_dist.output.manifest import SharedHashes, Tally
from chatvec_dist.output.segment_columns import gather, split_outputs
from chatvec_dist.planning.layout import layout
from chatvec_dist.planning.planner import PlannedTensor, Src

BLOCK = 64  # bytes per output hash block: 8 source elements per source block


def test_the_journal_writes_each_record_as_its_fields_packed_in_order(tmp_path):
    """The format (MAGIC 3) is unchanged: a record is its length and xxh3-64, then the unit's fields in MessagePack,
    with or without its columns gathered beforehand."""
    for given in (False, True):
        path = tmp_path / f"{given}.journal"
        journal = Journal(path)
        for r in units():
            journal.append(r, gather(r.segments) if given else None)
        journal.close()
        want = MAGIC
        for r in units():
            s = r.segments
            record = [r.unit, r.worker, r.node, r.seconds, [x.index for x in s], [x.blocks for x in s]]
            record += [[getattr(x.stats, k) for x in s] for k in ("cp_sq", "delta_sq", "update_sq", "nan", "inf")]
            record += [[x.sources for x in s]] + [[getattr(x.stats, k) for x in s] for k in ("kept", "agree", "signed")]
            record += [[[p.shard, p.number, p.etag, p.size] for p in r.parts]]
            payload = msgpack.packb(record, use_bin_type=True)
            want += HEAD.pack(len(payload), xxhash.xxh3_64_intdigest(payload)) + payload
        assert path.read_bytes() == want, given
        assert Journal.load(path, 0) == {u.unit: u for u in units()}


def test_gather_transposes_an_outputs_segments():
    s = [units()[1].segments[0], units()[2].segments[0]]
    c = gather(s)
    assert (list(c.index), list(c.blocks), list(c.sources)) == ([3, 9], [s[0].blocks, s[1].blocks], [(), s[1].sources])
    assert c.field("cp_sq") == [1e300, 0.0] and c.field("kept") == [[4, 0], []] and c.field("signed") == [11, 0]
    assert list(c.stats) == [s[0].stats, s[1].stats]
    empty = gather([])
    assert empty.index == () and len(empty.fields) == 8 and not any(empty.fields)


def test_split_outputs_keeps_each_outputs_segments_in_order():
    stats = Stats()
    interleaved = [SegmentResult(o, i, (), stats) for i in range(5) for o in range(3)]  # a run: tensor by tensor
    irregular = [SegmentResult(o, i, (), stats) for i, o in enumerate([2, 0, 0, 1, 2, 0])]  # pieces alone
    for segments in (interleaved, irregular):
        want = [[s for s in segments if s.output == o] for o in range(3)]
        assert split_outputs(segments, 3) == want
    assert split_outputs([], 2) == [[], []]


def digest(*key: int) -> bytes:
    return xxhash.xxh3_128_digest(repr(key).encode())


def test_shared_source_hashes_are_reused_only_for_the_very_same_objects():
    one = ((0, digest(1)),)
    first = [(one, ((0, digest(2)),)), (((0, digest(3)), (1, digest(4))),)]  # the second: a source of two blocks
    shared = SharedHashes()
    want = [(xxhash.xxh3_128_hexdigest(digest(1)), xxhash.xxh3_128_hexdigest(digest(2))), None]
    found = shared.of(first)
    assert found == want
    assert shared.of(list(first)) is found  # the very same objects: the same list
    equal = [tuple(tuple(b) for b in s) for s in first]  # equal, other objects: looked up anew, equal hashes
    again = shared.of(equal)
    assert again == want and again is not found


def planned(sizes: list[int]) -> list[PlannedTensor]:
    """F32 tensors of `sizes` elements, each read from CP alone (one source)."""
    ts, at = [], 0
    for k, n in enumerate(sizes):
        ts.append(PlannedTensor(f"t{k}", "copy", "", (n,), "F32", Src("cp", at, "F32"), (), n))
        at += 4 * n
    return ts


def test_tally_rows_from_one_segment_tensors_and_pieces_as_summed_in_the_test():
    """Tensors complete with one segment (stored column by column) beside a tensor of three blocks whose pieces come
    in two units, a unit redone (its segments again: ignored) and non-zero NaN/Inf counts in a unit of both."""
    sizes = [4, 8, 40, 3]  # elements: a block of output (16 F32) and of source (8) each, but 40: 3 and 5
    lay = layout(planned(sizes), max_shard_size=10**6)
    tally = Tally(lay, BLOCK)

    def seg(i: int, blocks: range, stats: Stats) -> SegmentResult:
        end = min(16 * blocks.stop, sizes[i])  # the piece's elements' end
        srcs = tuple((b, digest(i, 100 + b)) for b in range(2 * blocks.start, -(-end // 8)))
        return SegmentResult(0, i, tuple((b, digest(i, b)) for b in blocks), stats, (srcs,))

    first = [seg(0, range(1), Stats(4.0, 1.0, 0.25, 1, 0)), seg(2, range(2), Stats(9.0, 2.0, 1.0, 0, 2))]
    second = [seg(1, range(1), Stats(16.0, 0.0, 0.0)), seg(2, range(2, 3), Stats(16.0, 1.0, 3.0, 5, 0))]
    last = [seg(3, range(1), Stats(1.0, 3.0, 2.0))]
    tally.add_all(first, "w0", "n0", 0.5)
    tally.add_all(second, "w1", "n1", 0.25)
    tally.add_all(first, "w2", "n2", 9.0)  # redone: the same bytes again
    tally.add_all(last, "w1", "n1", 0.125)
    rows = tally.table("t", {}).to_pylist()

    def one(i: int) -> str:  # a tensor of one block, and a source of one
        return xxhash.xxh3_128_hexdigest(digest(i, 0))

    pieces = xxhash.xxh3_128_hexdigest(b"".join(digest(2, b) for b in range(3)))
    assert [r["hash"] for r in rows] == [one(0), one(1), pieces, one(3)]
    assert [r["source_digests"][0]["hash"] for r in rows] == [
        xxhash.xxh3_128_hexdigest(digest(0, 100)),
        xxhash.xxh3_128_hexdigest(digest(1, 100)),
        xxhash.xxh3_128_hexdigest(b"".join(digest(2, 100 + b) for b in range(5))),
        xxhash.xxh3_128_hexdigest(digest(3, 100)),
    ]
    assert [r["cp_norm"] for r in rows] == [None] * 4  # CP copied as stored: not measured
    assert [r["delta_norm"] for r in rows] == [None] * 4  # no terms
    assert [r["nan_count"] for r in rows] == [1, 0, 5, 0] and [r["inf_count"] for r in rows] == [0, 0, 2, 0]
    assert [r["worker"] for r in rows] == ["w0", "w1", "w0,w1", "w1"] and rows[2]["node"] == "n0,n1"
    assert [r["seconds"] for r in rows] == [0.5, 0.25, 0.75, 0.125]
    assert tally.nonfinite() == [("t0", 1, 0), ("t2", 5, 2)]
    assert math.isclose(tally.totals.cp_sq[2], 25.0) and tally.totals.update_sq.tolist() == [0.25, 0.0, 4.0, 2.0]
