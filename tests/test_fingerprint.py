"""The job digest over a compact canonical encoding of the plan (fingerprint.py): any change of the recipe, a
layout, a unit or an input's stats makes another job; equal plans, shared or not, the same one."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path

import pytest
from test_plan_reuse import _Alone

from chatvec_dist import fingerprint, job
from chatvec_dist.api import make_recipe
from chatvec_dist.demo import make_demo_models
from chatvec_dist.fingerprint import tree_digest
from chatvec_dist.planning import plan as plan_module
from chatvec_dist.planning.layout import Piece, Shard
from chatvec_dist.planning.plan import plan
from chatvec_dist.planning.planner import Src
from chatvec_dist.planning.sparsity import TermDare, TiesPlan
from chatvec_dist.recipe.spec import Recipe, Target, Vector
from chatvec_dist.term import Term


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo_models(tmp_path_factory.mktemp("fingerprint"))


def planned_batch(demo: dict[str, Path], out: Path):
    recipe = make_recipe(demo["base"], demo["chat"], {"a": demo["cp"], "b": demo["cp"]}, out)
    return plan(recipe)


def with_tensor(planned, target: int, index: int, **changes):
    """`planned` with one planned tensor of one target's layout changed."""
    tp = planned.targets[target]
    tensors = list(tp.layout.tensors)
    placed = tensors[index]
    tensors[index] = dataclasses.replace(placed, tensor=dataclasses.replace(placed.tensor, **changes))
    return with_layout(planned, target, tensors=tensors)


def with_layout(planned, target: int, **changes):
    targets = list(planned.targets)
    tp = targets[target]
    targets[target] = dataclasses.replace(tp, layout=dataclasses.replace(tp.layout, **changes))
    return dataclasses.replace(planned, targets=targets)


def test_any_change_of_the_plan_or_inputs_is_another_job(demo, tmp_path):
    planned = planned_batch(demo, tmp_path / "out")
    inputs = job._input_stats(planned)
    tensors = planned.targets[0].layout.tensors
    i = next(i for i, p in enumerate(tensors) if p.tensor.terms)  # a merged tensor
    placed = tensors[i]
    t = placed.tensor
    assert t.cp is not None and len(t.terms) == 1
    plus, minus = t.terms[0].plus, t.terms[0].minus
    term = t.terms[0]
    changed = {
        "name": with_tensor(planned, 0, i, name=t.name + "x"),
        "rule": with_tensor(planned, 0, i, rule="copy"),
        "reason": with_tensor(planned, 0, i, reason="excluded"),
        "shape": with_tensor(planned, 0, i, shape=(*t.shape[:-1], t.shape[-1], 1)),
        "dtype": with_tensor(planned, 0, i, out_dtype="F32"),
        "cp path": with_tensor(planned, 0, i, cp=dataclasses.replace(t.cp, path=t.cp.path + "x")),
        "cp start": with_tensor(planned, 0, i, cp=dataclasses.replace(t.cp, start=t.cp.start + 2)),
        "cp segments": with_tensor(planned, 0, i, cp=dataclasses.replace(t.cp, segments=((t.cp.path, 0, 1),))),
        "cp scale": with_tensor(planned, 0, i, cp=dataclasses.replace(t.cp, scale=Src("s", 0, "F32"))),
        "alpha": with_tensor(planned, 0, i, terms=(term._replace(alpha=0.5),)),
        "alpha as int": with_tensor(planned, 0, i, terms=(term._replace(alpha=1),)),
        "alpha 0.0": with_tensor(planned, 0, i, terms=(term._replace(alpha=0.0),)),
        "alpha -0.0": with_tensor(planned, 0, i, terms=(term._replace(alpha=-0.0),)),
        "second's alpha": with_tensor(planned, 1, i, terms=(term._replace(alpha=0.5),)),
        "plus path": with_tensor(planned, 0, i, terms=(Term(term.alpha, dataclasses.replace(plus, path="x"), minus),)),
        "minus start": with_tensor(
            planned, 0, i, terms=(Term(term.alpha, plus, dataclasses.replace(minus, start=minus.start + 2)),)
        ),
        "no minus": with_tensor(planned, 0, i, terms=(Term(term.alpha, plus, None),)),
        "swapped": with_tensor(planned, 0, i, terms=(Term(term.alpha, minus, plus),)),
        "merged": with_tensor(planned, 0, i, merge_elems=t.merge_elems - 1),
        "rows": with_tensor(planned, 0, i, rows=((0, 1),)),
        "row source": with_tensor(planned, 0, i, row_src=plus),
        "dare": with_tensor(planned, 0, i, dare=(TermDare(0.5, 1, 2**31),)),
        "ties": with_tensor(planned, 0, i, ties=TiesPlan(0.5, True, 3)),
        "second target": with_tensor(planned, 1, i, reason="excluded"),
        "offset": with_layout(
            planned,
            0,
            tensors=[*tensors[:i], dataclasses.replace(placed, offset=placed.offset + 8), *tensors[i + 1 :]],
        ),
        "shard header": with_layout(
            planned,
            0,
            shards=[Shard(s.name, s.header + b" ", s.size) for s in planned.targets[0].layout.shards],
        ),
        "unit": dataclasses.replace(
            planned, units=[dataclasses.replace(planned.units[0], pieces=(*planned.units[0].pieces, Piece(0, 0, 1)))]
        ),
        "block": dataclasses.replace(planned, block_bytes=planned.block_bytes // 2),
        "recipe": dataclasses.replace(planned, recipe=dataclasses.replace(planned.recipe, unit_bytes=2**20)),
    }
    base = job._digests(planned, inputs)
    assert len(set(base)) == 2  # each output its own
    found = {what: job._digests(p, inputs) for what, p in changed.items()}
    path = next(iter(inputs))
    found["input"] = job._digests(planned, {**inputs, path: [*inputs[path][:-1], inputs[path][-1] + 1]})
    for what, digests in found.items():
        assert set(digests).isdisjoint(base), what
    assert len({d[0] for d in found.values()}) == len(found)  # and no two changes the same job


def test_equal_plans_are_the_same_job_shared_layouts_or_not(demo, tmp_path, monkeypatch):
    first, again = planned_batch(demo, tmp_path / "out"), planned_batch(demo, tmp_path / "out")
    assert first.targets[0].layout is not again.targets[0].layout
    inputs = job._input_stats(first)
    assert job._digests(first, inputs) == job._digests(again, inputs)
    shared = with_layout(first, 1)  # a copy of the second layout, then both targets given the first's
    shared.targets[1] = dataclasses.replace(shared.targets[1], layout=first.targets[0].layout)
    assert shared.targets[0].layout is shared.targets[1].layout
    assert job._digests(shared, inputs) == job._digests(first, inputs)  # the two layouts were equal
    places = encoded(monkeypatch)
    fingerprint.tree_digests([t.layout for t in shared.targets])
    once = len(places)
    fingerprint.tree_digests([shared.targets[0].layout])
    assert len(places) == 2 * once  # the second one, the same object, not encoded again


@pytest.mark.parametrize(
    "one, other",
    [
        (("ab", "c"), ("a", "bc")),
        ([(1, 2), (3,)], [(1,), (2, 3)]),
        ([1], [1.0]),
        ([1], [True]),
        ([None], ["None"]),
        ([0.0], [-0.0]),
        ([1.5], [1.5000000000000002]),
        ([2**63], [2**63 + 1]),  # past int64: by repr
        ([1, 2**63], [1, -(2**63)]),
        ([b"a"], ["a"]),
        (["\ud800"], ["\ufffd"]),  # a lone surrogate is not the replacement character
        ([{"a": 1}], [{"a": "1"}]),
        ([{"a": 1, "b": 2}], [{"b": 2, "a": 1}]),  # a dict's order is part of it (as its repr's)
        ([b"ab", b"c"], [b"a", b"bc"]),
        ([Src("a", 1, "F32")], [Src("a", 1, "F32", (), Src("a", 1, "F32"))]),
        ([Term(1.0, None, None)], [(1.0, None, None)]),
    ],
)
def test_different_trees_never_encode_alike(one, other):
    assert tree_digest(one) != tree_digest(other)


def test_a_set_encodes_in_a_canonical_order_and_equal_trees_alike():
    assert tree_digest([{"b", "a", "c"}]) == tree_digest([{"c", "a", "b"}])
    assert tree_digest([Src("a", 1, "F32")]) == tree_digest([Src("a", 1, "F32")])
    assert tree_digest(1) == tree_digest(1) != hashlib.sha256(b"").digest()


def encoded(monkeypatch) -> list[tuple[str, ...]]:
    """The places in the tree (classes and fields from the root) of each column encoded from now on, not taken
    from the memo."""
    places: list[tuple[str, ...]] = []
    real = fingerprint._feed_column
    monkeypatch.setattr(
        fingerprint, "_feed_column", lambda v, feed, memo, at: places.append(at) or real(v, feed, memo, at)
    )
    return places


def sweep(demo: dict[str, Path], *alphas: float) -> Recipe:
    cp = str(demo["cp"])
    targets = tuple(Target(f"t{i}", cp, f"o/t{i}", (a,)) for i, a in enumerate(alphas))
    return Recipe(vectors=(Vector(str(demo["chat"]), str(demo["base"])),), targets=targets, unit_bytes=4096)


def test_a_sweep_digests_as_its_layouts_made_apart(demo, monkeypatch):
    """Layouts that share sub-objects (planning/reuse.py) digest as equal ones made from distinct objects, in any
    order, together or alone: a digest taken from the memo is the one it would be."""
    recipe = sweep(demo, 1.0, 0.5, -0.0, 0.0, 0.5)
    shared = [t.layout for t in job.plan(recipe).targets]
    monkeypatch.setattr(plan_module, "Reuse", _Alone)
    apart = [t.layout for t in job.plan(recipe).targets]
    first, second = shared[0].tensors[-1].tensor, shared[1].tensors[-1].tensor
    assert first is not second and first.terms[0].plus is second.terms[0].plus and first.cp is second.cp
    assert apart[0].tensors[-1].tensor.cp is not apart[1].tensors[-1].tensor.cp
    got = fingerprint.tree_digests(shared)
    alone = [tree_digest(lay) for lay in shared]
    assert got == alone == fingerprint.tree_digests(apart) == [tree_digest(lay) for lay in apart]
    assert fingerprint.tree_digests(shared[::-1]) == got[::-1]
    assert fingerprint.tree_digests([shared[0], apart[1], shared[2], apart[3]]) == got[:4]
    assert got[1] == got[4] and len(set(got)) == 4  # -0.0 is not 0.0


def test_a_sweep_encodes_once_what_its_layouts_share(demo, monkeypatch):
    shared = [t.layout for t in job.plan(sweep(demo, 1.0, 0.5, 0.25)).targets]
    places = encoded(monkeypatch)
    fingerprint.tree_digests(shared[:1])
    one = list(places)
    places.clear()
    fingerprint.tree_digests(shared)
    assert places[: len(one)] == one
    tensor = ("Layout", "tensors", "list", "[]", "Placed", "tensor", "PlannedTensor")
    again = [tuple(name.rsplit(".", 1)[-1] for name in at) for at in places[len(one) :]]
    # each other layout: itself, its tensors, their terms and alphas; all else is the same objects as the first's
    assert again == 2 * [
        (),
        ("Layout", "tensors"),
        ("Layout", "tensors", "list", "[]"),
        tensor[:-1],
        (*tensor, "terms"),
        (*tensor, "terms", "tuple", "[]"),
        (*tensor, "terms", "tuple", "[]", "Term", "alpha"),
    ]


def test_the_encoding_is_as_documented():
    """A column: its class names (and, when several, which value is of which), then a primitive's bytes or a
    sub-column's sha256 per field (a sequence: its lengths, then its items as one column)."""

    def chunk(data: bytes) -> bytes:
        return len(data).to_bytes(8, "little") + data

    def sha(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    alpha = sha(chunk(b"builtins.float") + chunk(struct.pack("<d", 0.5)))
    plus = sha(chunk(b"builtins.str") + chunk(struct.pack("<q", 2)) + chunk("pé".encode()))
    minus = sha(chunk(b"builtins.NoneType") + chunk(struct.pack("<q", 1)))
    assert tree_digest(Term(0.5, "pé", None)) == sha(chunk(b"chatvec_dist.term.Term") + alpha + plus + minus)
    items = sha(
        chunk(bytes([0, 1]))  # 1 is the first class's, "a" the second's
        + chunk(b"builtins.int")
        + chunk(b"q" + struct.pack("<q", 1))
        + chunk(b"builtins.str")
        + chunk(struct.pack("<q", 1))
        + chunk(b"a")
    )
    assert tree_digest([1, "a"]) == sha(chunk(b"builtins.list") + chunk(struct.pack("<q", 2)) + items)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    name: str
    size: int


@dataclasses.dataclass(frozen=True)
class _Node:
    leaves: list
    alpha: float


def test_tree_digests_reports_the_places_each_value_encoded_and_no_other():
    """`encoded`: per value, the places whose column it encoded: the first value's all; a later one's only those
    not the very objects of the value before it (a field of new objects, the way to it); the digests unchanged."""
    leaves = [_Leaf("aa", 1), _Leaf("bb", 2)]
    first = _Node(leaves, 1.0)
    again = _Node(leaves, 2.0)  # the very leaves list: only alpha and the root encoded
    renamed = _Node([_Leaf("aa", 1), _Leaf("".join("bb"), 2)], 2.0)  # new leaves, one name an equal other str
    values = [first, again, again, renamed]
    got: list[set[tuple[str, ...]]] = []
    assert fingerprint.tree_digests(values, got) == fingerprint.tree_digests(values)
    node, leaf = fingerprint.class_name(_Node), fingerprint.class_name(_Leaf)
    way = (node, "leaves", "builtins.list", "[]")
    assert got[0] == {(), (node, "leaves"), (node, "alpha"), way, (*way, leaf, "name"), (*way, leaf, "size")}
    assert got[1] == {(), (node, "alpha")} and got[2] == set()
    assert got[3] == {(), (node, "leaves"), way, (*way, leaf, "name")}  # `size`: small ints, the very objects
