"""A Ray unit's context packed as columns (exec/context_columns.py): the same context back, its objects shared as
they were, and a unit run with it reports what it reports with the context itself."""

from __future__ import annotations

import dataclasses
from itertools import chain

import chatvec_dist
from chatvec_dist.exec.context_columns import decode, encode, pack, unpack
from chatvec_dist.exec.messages import OutputContext, WorkContext
from chatvec_dist.exec.unit_context import unit_context
from chatvec_dist.planning.layout import Placed
from chatvec_dist.planning.planner import PlannedTensor, Src
from chatvec_dist.planning.sparsity import TermDare, TiesPlan
from chatvec_dist.term import Term


def _sharing(values: list) -> list[int]:
    """Each value's first place among the values that are the very same object."""
    first: dict[int, int] = {}
    return [first.setdefault(id(v), i) for i, v in enumerate(values)]


def test_every_field_comes_back_equal_and_shared_where_whole_columns_were():
    scale = Src("/m/s.safetensors", 8, "F32")
    plain, other = Src("/m/a.safetensors", 100, "BF16"), Src("/m/b.safetensors", 200, "BF16")
    experts = Src("/m/e.safetensors", 300, "F8_E4M3", (("/m/e.safetensors", 300, 4), ("/m/f.safetensors", 8, 4)), scale)
    tensors = [
        PlannedTensor("a", "merge", "", (2, 3), "BF16", plain, (Term(0.5, other, plain),), 6),
        PlannedTensor("b", "merge", "experts:mapped", (8,), "F8_E4M3", experts, (Term(-0.0, experts, None),), 8),
        PlannedTensor("c", "copy", "non-float", (), "I64", plain, (), 0),
        PlannedTensor(
            "d", "merge_rows", "", (4, 2), "F32", None, (Term(1.0, plain, other), Term(2.0, other, None)), 6,
            rows=((3, 1),), row_src=other, dare=(TermDare(0.5, 7, 1 << 31), None), ties=TiesPlan(0.2, True, 3),
        ),
    ]  # fmt: skip
    placed = [Placed(t, k % 2, 64 * k, 24) for k, t in enumerate(tensors)]
    again = [dataclasses.replace(p, offset=p.offset + 1) for p in placed[:2]] + placed[2:]  # two outputs sharing
    ctx = WorkContext(
        [OutputContext(dict(enumerate(placed)), ["x"]), OutputContext(dict(enumerate(again)), ["y"])], 1024, {}
    )
    back = unpack(pack(ctx))
    assert back == ctx
    for get in (lambda p: p.tensor, lambda p: p.tensor.cp, lambda p: p.tensor.terms):  # whole columns shared
        want = [get(p) for p in chain(placed, again)]
        found = [get(p) for o in back.outputs for p in o.tensors.values()]  # type: ignore[union-attr]
        assert _sharing(found) == _sharing(want)
    found = [p for o in back.outputs for p in o.tensors.values()]  # type: ignore[union-attr]
    assert _sharing(found) == list(range(len(found)))  # of a column partly shared, an output's own objects
    assert back.outputs[0].tensors[1].tensor.terms[0].alpha.hex() == "-0x0.0p+0"  # type: ignore[index]


def test_other_values_travel_as_they_are():
    mixed = [1, "a", None, (1, 2), TiesPlan(0.5, False, 2)]
    assert encode(mixed) is mixed and decode(encode(mixed)) == mixed
    assert decode(encode([(1, 2), (3,)])) == [(1, 2), (3,)]
    assert decode(encode([])) == []


def test_a_batchs_units_packed_are_the_same_units(tmp_path):
    from chatvec_dist.demo import make_demo_models
    from chatvec_dist.exec.worker import UnitRunner

    models = make_demo_models(tmp_path / "demo")
    alphas = [0.25, 0.5, 1.0]
    recipe = chatvec_dist.make_recipe(
        str(models["base"]), str(models["chat"]), str(models["cp"]), str(tmp_path / "o"), 0.5
    )
    recipe = dataclasses.replace(
        recipe, targets=[dataclasses.replace(recipe.targets[0], name=f"t{a}", alphas=(a,), out=str(tmp_path / f"o{a}")) for a in alphas]
    )  # fmt: skip
    planned = chatvec_dist.plan(dataclasses.replace(recipe, unit_bytes=64 * 1024))
    outputs = []
    for k, tp in enumerate(planned.targets):
        paths = [str(tmp_path / f"{k}-{s.name}") for s in tp.layout.shards]
        for path, s in zip(paths, tp.layout.shards):
            with open(path, "wb") as f:
                f.write(s.header)
                f.truncate(s.size)
        outputs.append(OutputContext(tp.layout.tensors, paths))
    whole = WorkContext(outputs, planned.block_bytes, {})
    runner = UnitRunner(whole, device="cpu")
    try:
        for unit in planned.units:
            cut = unit_context(whole, unit)
            back = unpack(pack(cut))
            assert back == cut, unit.id
            runner.ctx = cut
            want = runner.run(unit).segments
            runner.ctx = back
            assert runner.run(unit).segments == want, unit.id
    finally:
        runner.close()
