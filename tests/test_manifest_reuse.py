"""A batch's manifests share the columns its layouts fix (output/layout_alike.py): each output's manifest must still
be exactly the one it gets alone, and a layout is taken for an earlier one's only where every input but the terms'
alphas is the very same object."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import swept_layout
from test_manifest_columns import planned
from test_plan_reuse import _targets

from chatvec_dist import job
from chatvec_dist.demo import make_demo_models
from chatvec_dist.fingerprint import tree_digests
from chatvec_dist.output import manifest_columns
from chatvec_dist.output.columns_digest import column_digest, columns_digest
from chatvec_dist.output.layout_alike import Inputs, alike, known, record_digested
from chatvec_dist.output.manifest import read_manifest
from chatvec_dist.output.manifest_columns import LayoutColumns, layout_columns
from chatvec_dist.output.verify import verify
from chatvec_dist.planning.layout import Layout, Placed, layout
from chatvec_dist.planning.planner import PlannedTensor
from chatvec_dist.recipe.spec import Recipe, RunOptions, Target, Vector
from chatvec_dist.term import Term


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo_models(tmp_path_factory.mktemp("demo"))


def same_columns(got: LayoutColumns, want: LayoutColumns) -> None:
    """Equal columns, by their canonical encoding (-0.0 is not 0.0 there), and digests made from them."""
    assert got.fixed.keys() == want.fixed.keys()
    for name, column in got.fixed.items():
        assert column_digest(column) == column_digest(want.fixed[name]) == got.digests[name], name
    assert got.digests == want.digests
    assert [column_digest(a) for a in got.sources] == [column_digest(a) for a in want.sources]
    for name in ("counts", "measured", "changed", "terms", "counted", "ties"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), name
    assert got.merge_elems == want.merge_elems
    assert got.sources_head.copy().digest() == want.sources_head.copy().digest()


def test_each_batched_target_gets_the_columns_it_gets_alone(demo):
    """Targets alike and unlike in turn (test_plan_reuse's): an alpha sweep's take the columns of the target before
    them but for `alphas` (-0.0 and 0.0, 1 and 1.0 included); every target's equal those made from scratch."""
    recipe = Recipe(
        vectors=(Vector(str(demo["chat"]), str(demo["base"])),),
        targets=tuple(_targets(str(demo["cp"]), str(demo["base"]))),
        unit_bytes=4096,
    )
    targets = job.plan(recipe).targets
    got = {t.target.name: layout_columns(t.layout) for t in targets}  # in order: each after the one before
    for t in targets:
        same_columns(got[t.target.name], manifest_columns._make(t.layout))
    shared = [n for n in got if n != "a" and got[n].fixed["tensor"] is got["a"].fixed["tensor"]]
    assert shared == ["same", "half", "neg0", "zero", "int"]  # until the dtype changes
    assert got["other2"].fixed["tensor"] is got["other"].fixed["tensor"]
    assert got["neg0"].fixed["alphas"] is not got["zero"].fixed["alphas"]
    assert str(got["neg0"].fixed["alphas"].flatten()[0]) == "-0.0"
    for name in ("f32", "excl", "overlap", "rules", "rules2", "ties", "other"):  # not an alpha sweep's
        assert got[name].fixed["tensor"] is not got["a"].fixed["tensor"], name


def _other(value: object) -> object | None:
    """An object equal to `value` that is not it, where one can be made (None, (), small ints: never)."""
    if isinstance(value, str):
        found: object = "".join([value[:1], value[1:]])
    elif isinstance(value, int):
        found = int(str(value))
    elif isinstance(value, tuple):
        found = tuple(list(value))
    else:
        found = copy.copy(value)
    return found if found == value and found is not value else None


def _changed(lay: Layout, at: int, tensor: PlannedTensor | None = None, **fields: object) -> Layout:
    """`swept_layout(lay, 2.0)` with the tensor at `at` (or its Placed's `fields`) replaced."""
    swept = swept_layout(lay, 2.0)
    p = swept.tensors[at]
    placed = list(swept.tensors)
    placed[at] = dataclasses.replace(p, tensor=tensor or p.tensor, **fields)
    return Layout(placed, swept.shards)


def _cases() -> list[tuple[str, str]]:
    return [
        (kind, f.name) for kind, cls in (("tensor", PlannedTensor), ("placed", Placed)) for f in dataclasses.fields(cls)
    ]


@pytest.mark.parametrize("kind, field", [c for c in _cases() if c[1] not in ("terms", "tensor")])
def test_an_equal_but_other_object_anywhere_is_another_layout(kind, field):
    """Every field but the terms' alphas is compared by identity: an equal copy of any one value (the first tensor's
    that can be copied; another value where none can) is not taken for it, and the columns are made anew (and
    equal)."""
    lay = layout(planned(), max_shard_size=10**6)
    inputs = Inputs(lay)
    assert inputs.match(swept_layout(lay, 2.0)) and inputs.match(lay)
    owner = (lambda p: p.tensor) if kind == "tensor" else (lambda p: p)
    found = [(i, _other(getattr(owner(p), field))) for i, p in enumerate(lay.tensors)]
    copies = [(i, other) for i, other in found if other is not None]
    another = not copies  # small ints here, one object each: another value must not be taken for it either
    if another:
        value = getattr(owner(lay.tensors[0]), field)
        assert type(value) is int, (field, value)
        copies = [(0, value + 1)]
    at, other = copies[0]
    if kind == "tensor":
        changed = _changed(lay, at, dataclasses.replace(lay.tensors[at].tensor, **{field: other}))
    else:
        changed = _changed(lay, at, **{field: other})
    assert not inputs.match(changed)
    if another:
        return  # another value: not a layout the planner makes (a shard past the last), so no columns to compare
    manifest_columns._cached.clear()
    first = layout_columns(lay)
    got = layout_columns(changed)
    assert got.fixed["tensor"] is not first.fixed["tensor"]
    same_columns(got, manifest_columns._make(changed))


def test_other_terms_or_shards_are_another_layout():
    """A term's source (equal, another object), one term fewer, or an equal copy of a shard: not alike."""
    lay = layout(planned(), max_shard_size=200)
    inputs = Inputs(lay)
    t = lay.tensors[0].tensor
    plus = copy.copy(t.terms[0].plus)
    other_plus = dataclasses.replace(t, terms=(Term(2.0, plus, t.terms[0].minus), *t.terms[1:]))
    fewer = dataclasses.replace(t, terms=t.terms[:1])
    assert not inputs.match(_changed(lay, 0, other_plus))
    assert not inputs.match(_changed(lay, 0, fewer))
    swept = swept_layout(lay, 2.0)
    assert not inputs.match(Layout(swept.tensors, [copy.copy(s) for s in swept.shards]))
    assert not inputs.match(Layout(swept.tensors[:-1], swept.shards))


def test_a_batch_writes_the_manifests_it_writes_without_sharing_and_those_of_separate_runs(demo, tmp_path, monkeypatch):
    """An alpha sweep (-0.0 too), another dtype and another CP's sweep in one batch: each output's manifest rows (but
    the timings and workers) are those the batch writes with no columns shared, and a sweep's of the first CP those
    of its own run; verify rehashes every one."""
    vectors = (Vector(str(demo["chat"]), str(demo["base"])),)
    cp, other = str(demo["cp"]), str(demo["base"])
    alphas = {"a": (1.0,), "half": (0.5,), "neg0": (-0.0,), "f32": (0.5,), "other": (0.5,), "other2": (2.0,)}
    options = RunOptions(backend="local", workers=1, progress=False)

    def run(root: str, *names: str) -> dict[str, pa.Table]:
        targets = [
            Target(n, other if n.startswith("other") else cp, str(tmp_path / root / n), alphas[n])
            if n != "f32"
            else Target(n, cp, str(tmp_path / root / n), alphas[n], dtype="float32")
            for n in names
        ]
        job.run(Recipe(vectors=vectors, targets=tuple(targets), unit_bytes=4096), options)
        tables = {}
        for n in names:
            table, meta = read_manifest(tmp_path / root / n)
            assert verify(tmp_path / root / n) == [] and meta["rows_hash"]["sha256"] == columns_digest(table), n
            tables[n] = table.drop_columns(["seconds", "worker"])
        return tables

    batch = run("batch", *alphas)
    with monkeypatch.context() as m:
        m.setattr(Inputs, "match", lambda self, layout: False)
        m.setattr(job, "record_digested", lambda layouts, encoded: None)
        unshared = run("unshared", *alphas)
    for name in alphas:
        assert batch[name].num_rows > 0 and columns_digest(batch[name]) == columns_digest(unshared[name]), name
    for name in ("a", "half", "neg0"):
        alone = run("alone", name)[name]
        assert columns_digest(batch[name]) == columns_digest(alone), name


def test_a_layout_is_proved_alike_once_against_its_kinds_inputs_and_then_known(monkeypatch):
    """`alike` compares a layout with the inputs of the earlier one's kind (one `Inputs.match` per layout); `known`
    then answers without comparing, for any two of that kind, while they live; a layout not alike starts its own."""
    lay = layout(planned(), max_shard_size=10**6)
    a, b = swept_layout(lay, 2.0), swept_layout(lay, 3.0)
    matched: list[Layout] = []
    match = Inputs.match
    monkeypatch.setattr(Inputs, "match", lambda self, other: matched.append(other) or match(self, other))
    assert known(lay, lay) and not known(lay, a)
    assert alike(lay, a) and alike(a, b) and matched == [a, b]
    assert alike(lay, b) and known(b, a) and known(a, lay) and matched == [a, b]
    changed = _changed(lay, 0, dataclasses.replace(lay.tensors[0].tensor, name="other"))
    assert not alike(b, changed) and not known(b, changed) and matched[-1] is changed
    other = swept_layout(changed, 5.0)
    assert alike(changed, other) and known(other, changed) and not known(other, a)
    assert known(lay, b) and known(b, a)  # the sweep's kind: still known


@pytest.mark.parametrize("alpha", [2.0, -0.0, 1])
def test_a_swept_layout_with_tensors_without_terms_gets_the_columns_made_from_scratch(alpha):
    """Every kind of tensor (copies without terms: null alphas; two terms; token rows; FP8) swept to another alpha
    (-0.0, an int): the columns taken from the earlier layout's equal those `_make` makes of it."""
    lay = layout(planned(), max_shard_size=10**6)
    manifest_columns._cached.clear()
    first = layout_columns(lay)
    swept = swept_layout(lay, alpha)
    got = layout_columns(swept)
    assert got.fixed["tensor"] is first.fixed["tensor"] and got.fixed["alphas"] is not first.fixed["alphas"]
    assert got.fixed["alphas"].null_count == sum(not p.tensor.terms for p in lay.tensors) > 0
    same_columns(got, manifest_columns._make(swept))
    want = [[float(alpha)] * len(p.tensor.terms) if p.tensor.terms else None for p in lay.tensors]
    assert got.fixed["alphas"].to_pylist() == want
    assert [str(v) for v in got.fixed["alphas"].flatten().to_pylist()] == [str(float(alpha))] * sum(
        len(w or ()) for w in want
    )


def _digested(*layouts: Layout) -> None:
    """What a job's digest does: fingerprint every layout, then remember those it proved alike."""
    encoded: list[set[tuple[str, ...]]] = []
    tree_digests(list(layouts), encoded)
    record_digested(list(layouts), encoded)


def test_a_sweep_proved_alike_by_the_jobs_digest_is_never_compared_again(monkeypatch):
    """Layouts differing only in their alphas (-0.0, an int too), fingerprinted as a job's digest does: each known
    alike the others, the manifest's columns taken with no `Inputs` made, and equal to those made from scratch."""
    lay = layout(planned(), max_shard_size=10**6)
    sweep = [lay, swept_layout(lay, 2.0), swept_layout(lay, -0.0), swept_layout(lay, 1), swept_layout(lay, 1)]
    _digested(*sweep)
    assert all(known(a, b) for a in sweep for b in sweep)

    def refused(self, layout):
        raise AssertionError("compared again")

    monkeypatch.setattr(Inputs, "__init__", refused)
    manifest_columns._cached.clear()
    first = layout_columns(lay)
    for swept in sweep[1:]:
        got = layout_columns(swept)
        assert got.fixed["tensor"] is first.fixed["tensor"]
        same_columns(got, manifest_columns._make(swept))


def _one_field_changed(lay: Layout, kind: str, field: str) -> Layout:
    """`swept_layout(lay, 2.0)` with one field of one Placed or tensor an equal other object (or another value)."""
    owner = (lambda p: p.tensor) if kind == "tensor" else (lambda p: p)
    found = [(i, _other(getattr(owner(p), field))) for i, p in enumerate(lay.tensors)]
    at, other = next(((i, o) for i, o in found if o is not None), (0, None))
    if other is None:
        other = getattr(owner(lay.tensors[0]), field) + 1  # small ints: another value
    if kind == "tensor":
        return _changed(lay, at, dataclasses.replace(lay.tensors[at].tensor, **{field: other}))
    return _changed(lay, at, **{field: other})


@pytest.mark.parametrize("kind, field", [c for c in _cases() if c[1] not in ("terms", "tensor")])
def test_a_layout_with_any_field_another_object_is_not_proved_alike_by_the_digest(kind, field):
    """Every field of every Placed and tensor but the terms' alphas: an equal copy (or another value) in one of them
    and the job's digest does not prove the layout alike the one before it."""
    lay = layout(planned(), max_shard_size=10**6)
    swept, changed = swept_layout(lay, 3.0), _one_field_changed(lay, kind, field)
    _digested(lay, swept, changed)
    assert known(lay, swept) and not known(swept, changed) and not known(lay, changed)


def test_terms_moved_sources_copied_shards_copied_or_a_stranger_are_not_proved_alike_by_the_digest():
    """A term's source another equal object, a term moved to the next tensor (the sources end to end the same
    objects), copied shards, or a layout holding what is not a Placed: not alike the layout before."""
    lay = layout(planned(), max_shard_size=10**6)
    t0, t1 = lay.tensors[0].tensor, lay.tensors[1].tensor
    assert len(t0.terms) == 2 and not t1.terms  # merge.weight's second term moved to kept.weight
    swept = swept_layout(lay, 2.0)
    other_plus = dataclasses.replace(t0, terms=(Term(2.0, copy.copy(t0.terms[0].plus), t0.terms[0].minus), t0.terms[1]))
    placed = list(swept.tensors)
    placed[0] = dataclasses.replace(placed[0], tensor=dataclasses.replace(t0, terms=(Term(2.0, *t0.terms[0][1:]),)))
    placed[1] = dataclasses.replace(placed[1], tensor=dataclasses.replace(t1, terms=(Term(2.0, *t0.terms[1][1:]),)))
    moved = Layout(placed, swept.shards)
    copied = Layout(swept.tensors, [copy.copy(s) for s in swept.shards])
    first = Layout([lay.tensors[1], None, *lay.tensors[2:]], lay.shards)  # kept.weight, then not a Placed
    second = Layout([None, swept.tensors[1], *swept.tensors[2:]], lay.shards)  # the same terms per tensor
    for earlier, later in [(lay, _changed(lay, 0, other_plus)), (lay, moved), (lay, copied), (first, second)]:
        _digested(earlier, later)
        assert not known(earlier, later)


def test_a_jobs_alpha_sweep_commits_without_comparing_its_layouts(demo, tmp_path, monkeypatch):
    """A job of one CP's alpha sweep: its digest proves the layouts alike, so no commit makes `Inputs`; each output
    verifies, and its rows (but the timings and workers) are those of its own run."""
    vectors = (Vector(str(demo["chat"]), str(demo["base"])),)
    options = RunOptions(backend="local", workers=1, progress=False)
    alphas = {"a": (1.0,), "half": (0.5,), "neg0": (-0.0,)}

    def run(root: str, names: list[str]) -> dict[str, pa.Table]:
        targets = tuple(Target(n, str(demo["cp"]), str(tmp_path / root / n), alphas[n]) for n in names)
        job.run(Recipe(vectors=vectors, targets=targets, unit_bytes=4096), options)
        tables = {}
        for n in names:
            assert verify(tmp_path / root / n) == [], n
            tables[n] = read_manifest(tmp_path / root / n)[0].drop_columns(["seconds", "worker"])
        return tables

    with monkeypatch.context() as m:
        m.setattr(Inputs, "__init__", lambda self, layout: pytest.fail("a sweep's layout compared at its commit"))
        swept = run("sweep", list(alphas))
    for name in alphas:
        assert columns_digest(swept[name]) == columns_digest(run("alone", [name])[name]), name
