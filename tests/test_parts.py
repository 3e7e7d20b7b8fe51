"""Object-store part layout: every byte of every shard in exactly one part, parts large enough, the header first."""

from __future__ import annotations

import pytest

from chatvec_dist.dtypes import ITEMSIZE
from chatvec_dist.errors import PlanError
from chatvec_dist.planning.layout import MIN_PART, cut_units, layout
from chatvec_dist.planning.parts import COPY_ENV, plan_parts
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
    lay = layout(tensors([20]), max_shard_size=40 * MiB)
    units = cut_units([lay], 1 * MiB, at_shards=True)  # a large tensor cut in 1 MiB pieces
    with pytest.raises(PlanError, match=r"part 1 would be \d+ bytes: .*5 MiB.*--unit-size 8MiB") as e:
        plan_parts(lay, units)
    assert e.value.file == lay.shards[0].name


def plan_for_store(planned: list[PlannedTensor], unit_mib: int = 64, shard_mib: int = 5000):
    """What `plan()` does for an s3:// output: tensors in byte order, units within shards, then the parts."""
    order = sorted(planned, key=lambda t: -ITEMSIZE[t.out_dtype])
    lay = layout(order, max_shard_size=shard_mib * MiB)
    return lay, plan_parts(lay, cut_units([lay], unit_mib * MiB, at_shards=True))


def test_a_shard_of_mixed_dtypes_is_planned_in_byte_order():
    """Layout puts larger itemsizes first within a shard: units follow that order, one range per shard."""
    norm = PlannedTensor("norm", "merge", "", (2560,), "F32", Src("x", 0, "F32"), (), 2560)
    first, second = tensors([6, 6])
    mixed = [first, norm, second]  # BF16, F32, BF16 in name order
    lay, parts = plan_for_store(mixed)
    assert sum(len(ps) for ps in parts.values()) == 1 and parts[0][0].end == lay.shards[0].size


def test_small_tensors_before_a_large_one_join_its_first_piece():
    """Biases before a tensor larger than a unit made a part of their own, under 5 MiB, mid-shard."""
    lay, parts = plan_for_store(tensors([100, 1.5, 0.01, 100, 30]))
    sizes = [p.size for ps in sorted(parts.values(), key=lambda ps: ps[0].number) for p in ps]
    assert all(s >= MIN_PART for s in sizes[:-1]) and sum(sizes) == lay.shards[0].size


def test_a_shard_of_only_empty_tensors_gets_its_header_part():
    empty = PlannedTensor("empty", "merge", "", (0, 8), "BF16", Src("x", 0, "BF16"), (), 0)
    lay, parts = plan_for_store([*tensors([6]), empty], shard_mib=5)
    assert len(lay.shards) == 2
    last = [p for ps in parts.values() for p in ps if p.shard == 1]
    assert len(last) == 1 and (last[0].start, last[0].end) == (0, lay.shards[1].size)


def test_plan_to_a_store_takes_a_float32_tensor_among_bfloat16_ones(tmp_path):
    """Kept in their own dtypes: a plan for an s3:// output orders tensors as their shard holds them (larger
    itemsizes first), so that each unit's bytes in a shard are one range (it was 'writes two separate ranges')."""
    import torch

    import chatvec_dist
    from chatvec_dist.demo import save_checkpoint

    g = torch.Generator().manual_seed(0)
    for name in ("base", "chat", "cp"):
        weights = {
            "a.weight": torch.randn(1536, 1024, generator=g).bfloat16(),
            "b.norm": torch.randn(16, generator=g),  # float32: in the inputs' order after both others
            "c.weight": torch.randn(1536, 1024, generator=g).bfloat16(),
        }
        save_checkpoint(tmp_path / name, weights, {}, shards=2)  # a and c in one file, b in the other
    recipe = chatvec_dist.make_recipe(
        *(str(tmp_path / n) for n in ("base", "chat", "cp")), "s3://bucket/out", unit_bytes=8 * MiB
    )
    (tp,) = chatvec_dist.plan(recipe).targets
    assert tp.parts is not None and [(p.start, p.end) for ps in tp.parts.values() for p in ps] == [
        (0, tp.layout.shards[0].size)
    ]


def copies(sizes_mib: list[float], cp_at: list[int | None], url: str = "s3://b/cp.safetensors") -> list[PlannedTensor]:
    """1-D BF16 tensors; those with a CP offset in `cp_at` are copies of CP's at that byte offset of `url`, the
    others merges."""
    out = []
    for i, (s, at) in enumerate(zip(sizes_mib, cp_at)):
        n = int(s * MiB) // 2
        rule, src = ("copy", Src(url, at, "BF16")) if at is not None else ("merge", Src("x", 0, "BF16"))
        out.append(PlannedTensor(f"t{i}", rule, "excluded", (n,), "BF16", src, (), 0 if at is not None else n))
    return out


def test_a_part_is_a_copy_only_where_its_bytes_are_one_range_of_one_cp_object():
    """Four 6 MiB tensors, one part each (units of 6 MiB): the first part carries the header and is never a copy;
    a copy is marked with CP's offset of its first byte, checked here against the offsets given."""
    base = 1000
    adjacent = copies([6, 6, 6, 6], [base, base + 6 * MiB, base + 12 * MiB, base + 18 * MiB])
    lay, parts = plan_for_store(adjacent, unit_mib=6)
    found = sorted((p for ps in parts.values() for p in ps), key=lambda p: p.number)
    assert [p.copy for p in found] == [None] + [("s3://b/cp.safetensors", base + k * 6 * MiB) for k in (1, 2, 3)]
    for p in found[1:]:  # the part's bytes are CP's from there: offset in the shard ↔ offset in CP
        placed = next(t for t in lay.tensors if t.offset == p.start)
        assert p.copy == (placed.tensor.cp.path, placed.tensor.cp.start)

    mixed = copies([6, 6, 3, 3, 6], [base, None, base + 12 * MiB, base + 99 * MiB, base + 18 * MiB])
    found = sorted((p for ps in plan_for_store(mixed, unit_mib=6)[1].values() for p in ps), key=lambda p: p.number)
    assert [p.copy is not None for p in found] == [False, False, False, True]  # t2 and t3 apart in CP: not one


def test_no_copy_from_a_local_cp_another_dtype_or_when_turned_off(monkeypatch):
    local = copies([6, 6], [0, 6 * MiB], url="/data/cp.safetensors")
    assert all(p.copy is None for ps in plan_for_store(local, unit_mib=6)[1].values() for p in ps)
    converted = copies([6, 6], [0, 6 * MiB])
    converted[1] = PlannedTensor("t1", "copy", "excluded", (3 * MiB,), "BF16", Src("s3://b/c", 0, "F16"), (), 0)
    assert all(p.copy is None for ps in plan_for_store(converted, unit_mib=6)[1].values() for p in ps)
    monkeypatch.setenv(COPY_ENV, "0")
    assert all(p.copy is None for ps in plan_for_store(copies([6, 6], [0, 6 * MiB]), 6)[1].values() for p in ps)
    monkeypatch.setenv(COPY_ENV, "true")
    with pytest.raises(PlanError, match=COPY_ENV):
        plan_for_store(copies([6, 6], [0, 6 * MiB]), 6)


def test_no_copy_of_a_tensor_with_token_rows_from_chat():
    """A vocab:skip embedding whose chat-template rows come from the chat model is not CP's bytes: never copied."""
    import dataclasses

    with_rows = copies([6, 6], [0, 6 * MiB])
    with_rows[1] = dataclasses.replace(with_rows[1], rows=((5, 7),), row_src=Src("s3://b/chat", 0, "BF16"))
    found = sorted((p for ps in plan_for_store(with_rows, unit_mib=6)[1].values() for p in ps), key=lambda p: p.number)
    assert [p.copy for p in found] == [None, None]
    plain = sorted(
        (p for ps in plan_for_store(copies([6, 6], [0, 6 * MiB]), 6)[1].values() for p in ps), key=lambda p: p.number
    )
    assert plain[1].copy is not None  # the same layout without rows: a copy
