"""A unit's result packed for the way back from a Ray worker (exec/result_columns.py): the same result, its
sources' digests shared across outputs as they were; and what a real Ray run reports is what threads report."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq

from chatvec_dist.cli import main
from chatvec_dist.demo import make_demo_models
from chatvec_dist.exec.messages import PartResult, SegmentResult, Stages, UnitResult
from chatvec_dist.exec.result_columns import pack_result, unpack_result
from chatvec_dist.kernels.stats import Stats


def _result() -> UnitResult:
    shared = (((0, b"a" * 16), (1, b"b" * 16)), ((0, b"c" * 16),))  # two sources: one of two blocks
    other = (((0, b"d" * 16),),)
    segments = [
        SegmentResult(0, 3, ((0, b"x" * 16),), Stats(1.5, 2.0, -0.0, 1, 2, [3, 4], 5, 6), shared),
        SegmentResult(0, 4, ((0, b"y" * 16), (1, b"z" * 16)), Stats(math.inf, math.nan, 0.25), other),
        SegmentResult(1, 3, ((0, b"w" * 16),), Stats(), shared),  # another output: the very same sources
        SegmentResult(1, 5, (), Stats(delta_sq=7.0)),
    ]
    stages = Stages(1.0, 2.0, 3.0, 4.0, 10, 20)
    return UnitResult(7, segments, "w1", "node", 0.5, stages, [PartResult(1, 2, 3, '"etag"', 99)])


def test_a_result_comes_back_equal_its_sources_shared_as_they_were():
    result = _result()
    back = unpack_result(pack_result(result))
    assert repr(back) == repr(result)  # NaN compares unequal: every field, float bits shown
    assert all(type(s) is SegmentResult and type(s.stats) is Stats for s in back.segments)
    assert back.segments[0].sources is back.segments[2].sources
    assert back.segments[0].sources is not back.segments[1].sources
    assert math.copysign(1.0, back.segments[0].stats.update_sq) < 0  # -0.0 kept


def test_an_empty_result_comes_back_empty():
    result = UnitResult(0, [], "w", "n", 0.0)
    assert unpack_result(pack_result(result)) == result


def _rows(out: Path) -> list[dict]:
    """The manifest's rows but where and how long each tensor was computed."""
    return pq.read_table(out / "manifest.parquet").drop_columns(["worker", "node", "seconds"]).to_pylist()


def test_a_ray_batch_reports_what_threads_report(ray_local, tmp_path):
    models = make_demo_models(tmp_path / "demo")
    sources = [f"--{role}={models[role]}" for role in ("base", "chat", "cp")]
    outs = {}
    for backend in ("local", "ray"):
        outs[backend] = tmp_path / backend
        argv = ["merge", *sources, "--alpha", "0.5,1", "--out", str(outs[backend]), "--backend", backend]
        assert main([*argv, "--unit-size", "64KiB", "--no-progress"]) == 0
    folders = sorted(p.name for p in outs["local"].iterdir())
    assert len(folders) == 2 and folders == sorted(p.name for p in outs["ray"].iterdir())
    for name in folders:
        local, ray = outs["local"] / name, outs["ray"] / name
        assert _rows(ray) == _rows(local)
        assert any(row["delta_norm"] for row in _rows(ray))
        for shard in local.glob("*.safetensors"):
            assert (ray / shard.name).read_bytes() == shard.read_bytes()
