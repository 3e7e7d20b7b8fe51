"""Object-store part layout: every byte of every shard in exactly one part, parts large enough, the header first."""

from __future__ import annotations

import pytest

from chatvec_dist.errors import PlanError
from chatvec_dist.planning.layout import cut_units, layout
from chatvec_dist.planning.parts import MIN_PART, plan_parts
from chatvec_dist.planning.planner import PlannedTensor, Src

MiB = 2**20


def tensors(sizes_mib: list[float], dtype: str = "BF16") -> list[PlannedTensor]:
    """Planned 1-D merges of the given sizes (the sources' places do not matter here)."""
    src = Src("x.safetensors", 0, dtype)
    return [
        PlannedTensor(f"t{i}", "merge", "", (int(s * MiB) // 2,), dtype, src, (), int(s * MiB) // 2)
        for i, s in enumerate(sizes_mib)
    ]


def test_parts_tile_each_shard_and_units_never_span_two():
    lay = layout(tensors([3, 3, 20, 1, 1, 30, 6]), max_shard_size=40 * MiB)
    units = cut_units([lay], 8 * MiB, at_shards=True)
    parts = plan_parts(lay, units)
    for s, shard in enumerate(lay.shards):
        mine = sorted((p for ps in parts.values() for p in ps if p.shard == s), key=lambda p: p.number)
        assert [p.number for p in mine] == list(range(1, len(mine) + 1))
        assert mine[0].start == 0 and mine[-1].end == shard.size  # the header rides in part 1
        assert all(a.end == b.start for a, b in zip(mine, mine[1:]))
        assert all(p.size >= MIN_PART for p in mine[:-1])
    assert all(len({p.shard for p in ps}) == 1 for ps in parts.values())  # one shard per unit


def test_units_cut_at_shards_only_when_asked():
    lay = layout(tensors([3, 3, 3, 3]), max_shard_size=7 * MiB)
    assert len(lay.shards) == 2
    assert len(cut_units([lay], 64 * MiB)) == 1
    assert len(cut_units([lay], 64 * MiB, at_shards=True)) == 2


def test_a_part_below_five_mib_is_refused_naming_the_shard():
    lay = layout(tensors([1, 1, 1]), max_shard_size=40 * MiB)
    units = cut_units([lay], 1 * MiB, at_shards=True)
    with pytest.raises(PlanError, match=r"part 1 would be \d+ bytes: .*5 MiB.*--unit-size 8MiB") as e:
        plan_parts(lay, units)
    assert e.value.file == lay.shards[0].name
