"""The journal's records: what is appended is read back exactly; a record cut short or garbled, and every one after
it, is a unit to redo, never one misread; a journal of the earlier JSON format is redone; a driver killed mid-run
resumes from its outputs' journals to the same bytes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from conftest import slow_units_env

from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.exec.messages import PartResult, SegmentResult, UnitResult
from chatvec_dist.kernels.stats import Stats
from chatvec_dist.output import journal as journal_module
from chatvec_dist.output.journal import HEAD, MAGIC, Journal
from chatvec_dist.output.verify import verify
from chatvec_dist.output.workarea import JOURNAL_NAME, partial_path


def units(output: int = 0) -> list[UnitResult]:
    """Three units as `output`'s results: plain, sparse (DARE/TIES counts) with uploaded parts, and one segment
    with several blocks and sources of several blocks, one with none."""
    d = [bytes([k]) * 16 for k in range(8)]
    return [
        UnitResult(
            0, [SegmentResult(output, 0, ((0, d[0]),), Stats(1.5, 2.25, 0.1, 0, 0), (((0, d[1]),),))], "w0", "n0", 0.5
        ),
        UnitResult(
            7,
            [
                SegmentResult(output, 3, ((2, d[2]), (3, d[3])), Stats(1e300, 5e-324, -0.0, 3, 1, [4, 0], 9, 11)),
                SegmentResult(output, 4, (), Stats(float("inf"), 0.0, 0.0, 0, 2, [1, 1], 0, 0)),
            ],
            "w1",
            "n1",
            1.25,
            parts=[PartResult(output, 2, 5, '"0123456789abcdef0123456789abcdef"', 5 << 20)],
        ),
        UnitResult(
            2,
            [SegmentResult(output, 9, ((0, d[4]),), Stats(), (((4, d[5]), (5, d[6])), (), ((0, d[7]),)))],
            "w0",
            "n0",
            0.0,
        ),
    ]


def write(path: Path, results: list[UnitResult]) -> list[int]:
    """Append `results` to the journal at `path`; the file's size after each record."""
    journal, ends = Journal(path), []
    for r in results:
        journal.append(r)
        ends.append(path.stat().st_size)
    journal.close()
    return ends


def test_units_round_trip_as_any_output_with_raw_digests(tmp_path):
    path = tmp_path / JOURNAL_NAME
    write(path, units())
    assert Journal.load(path, 0) == {u.unit: u for u in units()}
    assert Journal.load(path, 3) == {u.unit: u for u in units(3)}  # segments and parts: as output 3's
    data = path.read_bytes()
    assert data.startswith(MAGIC) and data.count(MAGIC) == 1
    assert all(bytes([k]) * 16 in data for k in range(8)) and b"0606" not in data  # digests as bytes, no hex
    assert Journal.load(tmp_path / "missing", 0) == {}


def test_outputs_sharing_their_source_digests_objects_journal_each_record_as_packed_alone(tmp_path):
    """A batch's outputs report the very same source digests objects (exec/small_runs.py): their records pack the
    sources once, yet each is the bytes of its record packed alone, and reads back as its output's unit; a record
    whose sources are other objects (equal or not) is packed anew."""
    d = [bytes([k]) * 16 for k in range(6)]
    sources = [(((0, d[0]),), ((0, d[1]),)), (((0, d[2]),),)]
    other = [(((0, d[3]),), ((0, d[4]),)), (((0, d[5]),),)]
    alike = [tuple(tuple(tuple(b) for b in s) for s in t) for t in sources]  # equal, other objects

    def unit(output: int, srcs: list) -> UnitResult:
        segs = [
            SegmentResult(output, i, ((0, d[i]),), Stats(0.5 * output, 1.0, 2.0 + i), s) for i, s in enumerate(srcs)
        ]
        return UnitResult(4, segs, "w", "n", 0.25)

    done = [unit(0, sources), unit(1, sources), unit(2, other), unit(3, sources), unit(4, alike)]
    for o, r in enumerate(done):
        path = tmp_path / f"{o}.journal"
        write(path, [r])
        assert Journal.load(path, o) == {4: r}, o
        payload = path.read_bytes()[len(MAGIC) + HEAD.size :]
        assert payload == msgpack.packb(journal_module._record(r), use_bin_type=True), o


def test_an_opened_journal_stays_empty_until_a_unit_is_appended(tmp_path):
    """A work area whose journal is empty is discarded by a failed start: opening must not write to it."""
    path = tmp_path / JOURNAL_NAME
    Journal(path).close()
    assert path.stat().st_size == 0 and Journal.load(path, 0) == {}
    first, *rest = units()
    write(path, [first])
    write(path, rest)  # reopened: appended after, the format line not repeated
    assert path.read_bytes().count(MAGIC) == 1 and list(Journal.load(path, 0)) == [0, 7, 2]


def test_a_record_cut_short_anywhere_is_redone_and_dropped_when_reopened(tmp_path):
    path = tmp_path / JOURNAL_NAME
    ends = write(path, units())
    data = path.read_bytes()
    first, second, third = units()
    for cut in range(ends[0], ends[1]):  # the second record cut after any of its bytes (or none)
        path.write_bytes(data[:cut])
        assert Journal.load(path, 0) == {0: first}, cut
    write(path, [third])  # reopened on the last cut: what was cut short is dropped, the next record follows
    assert path.read_bytes() == data[: ends[0]] + data[ends[1] :]
    assert Journal.load(path, 0) == {0: first, 2: third}
    for cut in range(len(MAGIC) + 1):  # not even the format line
        path.write_bytes(data[:cut])
        assert Journal.load(path, 0) == {}, cut


def test_a_garbled_byte_makes_its_record_and_those_after_it_redone(tmp_path):
    path = tmp_path / JOURNAL_NAME
    ends = write(path, units())
    data = path.read_bytes()
    first = units()[0]
    for at in range(ends[0], ends[1]):  # every byte of the second record: its length, checksum or payload
        garbled = bytearray(data)
        garbled[at] ^= 0x41
        path.write_bytes(garbled)
        assert Journal.load(path, 0) == {0: first}, at
        Journal(path).close()  # reopened: cut back to the intact records
        assert path.read_bytes() == data[: ends[0]], at
    garbled = bytearray(data)
    garbled[3] ^= 1  # the format line: no record is read
    path.write_bytes(garbled)
    assert Journal.load(path, 0) == {}


def test_a_journal_of_the_earlier_json_format_is_redone_then_replaced(tmp_path):
    path = tmp_path / JOURNAL_NAME
    segment = [0, [[0, "00" * 16]], 1.0, 2.0, 3.0, 0, 0, [[0, "11" * 16]]]
    earlier = {"unit": 0, "segments": [segment], "worker": "w", "node": "n", "seconds": 0.1}
    path.write_text(json.dumps(earlier) + "\n")
    assert Journal.load(path, 0) == {}  # its unit is redone, never misread
    later = units()[2]
    write(path, [later])  # opened: emptied first
    assert path.read_bytes().startswith(MAGIC) and Journal.load(path, 0) == {2: later}


def shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("journal")
    models = make_demo_models(root / "models")
    args = ["merge", "--base", str(models["base"]), "--chat", str(models["chat"]), "--cp", str(models["cp"])]
    args += ["--alpha", "0.5,1", "--backend", "local", "--workers", "1", "--no-progress", "--unit-size", "16KiB"]
    assert main([*args, "--out", str(root / "ref")]) == 0
    return {"args": args, "ref": {name: shards(root / "ref" / name) for name in ("alpha0.5", "alpha1")}}


def test_a_driver_killed_mid_run_resumes_from_its_journals(demo, tmp_path, capsys):
    """kill -9 of a two-output batch once both journals hold two units: the rerun resumes those the journals of
    both outputs hold and writes the same bytes as an uninterrupted run."""
    argv = [*demo["args"], "--out", str(tmp_path / "out")]
    journals = [partial_path(tmp_path / "out" / name) / JOURNAL_NAME for name in demo["ref"]]
    proc = subprocess.Popen([sys.executable, "-m", "chatvec_dist.cli", *argv], env=slow_units_env(0.05))
    try:
        deadline = time.monotonic() + 300
        while min(len(Journal.load(j, 0)) for j in journals) < 2:
            assert proc.poll() is None, "the merge ended before it was killed"
            assert time.monotonic() < deadline, "no unit was journaled"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = set.intersection(*(set(Journal.load(j, 0)) for j in journals))
    assert len(done) >= 2
    capsys.readouterr()
    assert main(argv) == 0
    assert f"resuming: {len(done)} of " in capsys.readouterr().err
    for name, ref in demo["ref"].items():
        assert shards(tmp_path / "out" / name) == ref and verify(tmp_path / "out" / name) == []
