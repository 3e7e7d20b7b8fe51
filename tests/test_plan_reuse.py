"""A batch's targets share planning work (planning/reuse.py): each must still get exactly the plan it gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatvec_dist import job
from chatvec_dist.demo import make_demo_models
from chatvec_dist.planning import plan as plan_module
from chatvec_dist.planning.layout import layout
from chatvec_dist.recipe.alpha_rules import AlphaRule
from chatvec_dist.recipe.spec import Dare, Recipe, Target, Ties, Vector


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo_models(tmp_path_factory.mktemp("demo"))


def _targets(cp: str, other: str) -> list[Target]:
    """Targets alike and unlike: the same inputs under another name, alpha sweeps (-0.0 and 0.0, 1 and 1.0 are not
    the same alpha), another dtype, excludes, vocabulary policy, alpha rules, TIES, another CP."""
    return [
        Target("a", cp, "o/a", (1.0,)),
        Target("same", cp, "o/same", (1.0,)),
        Target("half", cp, "o/half", (0.5,)),
        Target("neg0", cp, "o/neg0", (-0.0,)),
        Target("zero", cp, "o/zero", (0.0,)),
        Target("int", cp, "o/int", (1,)),
        Target("f32", cp, "o/f32", (1.0,), dtype="float32"),
        Target("excl", cp, "o/excl", (0.5,), exclude=("norm",)),
        Target("overlap", cp, "o/overlap", (0.5,), vocab="overlap"),
        Target("rules", cp, "o/rules", (0.5,), alpha_rules=(AlphaRule("mlp", (0.25,)),)),
        Target("rules2", cp, "o/rules2", (0.75,), alpha_rules=(AlphaRule("mlp", (0.25,)),)),
        Target("ties", cp, "o/ties", (0.5,), ties=Ties(0.5)),
        Target("other", other, "o/other", (0.5,)),
        Target("other2", other, "o/other2", (2.0,)),
    ]


class _Alone:
    """Reuse that reuses nothing: every target planned and laid out from scratch, as before planning/reuse.py."""

    sides = None  # no vector side shared either

    def tensors(self, target, make):
        return make()

    def layout(self, tensors, max_shard_size, at_shards):
        return layout(tensors, max_shard_size, at_shards)


@pytest.mark.parametrize("dare", [None, Dare(0.5, seed=3)])
def test_each_batched_target_plans_as_it_does_alone(demo, dare, monkeypatch):
    recipe = Recipe(
        vectors=(Vector(str(demo["chat"]), str(demo["base"]), dare),),
        targets=tuple(_targets(str(demo["cp"]), str(demo["base"]))),
        unit_bytes=4096,
    )
    batch = job.plan(recipe)
    monkeypatch.setattr(plan_module, "Reuse", _Alone)
    alone = job.plan(recipe)
    for got, want in zip(batch.targets, alone.targets, strict=True):
        # repr: == takes -0.0 for 0.0 and 1 for 1.0, which the manifest and the kernels do not
        assert repr(got.layout) == repr(want.layout), got.target.name
        assert got.token_rows == want.token_rows
    assert batch.units == alone.units
    by = {t.target.name: t for t in batch.targets}
    assert by["same"].layout is by["a"].layout  # planned once
    assert by["half"].layout.shards is by["a"].layout.shards  # laid out once
    assert by["other2"].layout.shards is by["other"].layout.shards
    merged = [p.tensor for p in by["half"].layout.tensors if p.tensor.terms]
    assert merged and {t.terms[0].alpha for t in merged} == {0.5}
    assert {repr(p.tensor.terms[0].alpha) for p in by["neg0"].layout.tensors if p.tensor.terms} == {"-0.0"}


def test_a_repeated_target_errs_as_the_first_one_did(demo):
    """An error of an earlier target stops the plan there, as before: no later target hides or changes it."""
    vectors = (Vector(str(demo["chat"]), str(demo["base"])),)
    bad = [Target(f"t{i}", str(demo["cp"]), f"o/t{i}", (1.0,), vocab="full") for i in range(2)]
    with pytest.raises(Exception, match="--vocab full needs equal shapes") as batch:
        job.plan(Recipe(vectors=vectors, targets=tuple(bad)))
    with pytest.raises(Exception, match="--vocab full needs equal shapes") as alone:
        job.plan(Recipe(vectors=vectors, targets=(bad[0],)))
    assert str(batch.value) == str(alone.value)
