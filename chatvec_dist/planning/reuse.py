"""Work shared by the targets of one job: a batch of outputs (several CPs, an alpha sweep) plans most tensors alike.

A target whose planning inputs (every Target field but its name and output) equal an earlier target's takes that
target's tensor plan as it is; one that differs only in its alphas (and has no alpha rules) takes it with its own
alphas in every term, which is all the alphas change in a plan. A tensor list whose names, shapes and output dtypes
equal an earlier one's takes that layout's shards and offsets. Fields are compared by their repr: -0.0 is not 0.0,
1 is not 1.0 (both reach the manifest), and a field this module does not know is compared too, never ignored."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

from ..recipe.spec import Target
from ..term import Term, make_term
from .layout import Layout, layout, make_placed
from .planner import PlannedTensor, make_planned
from .tokens import TokenRow
from .vectors import Sides

# A target's planned tensors (before layout) and its token rows.
TargetTensors = tuple[list[PlannedTensor], tuple[TokenRow, ...]]


def inputs_key(target: Target, *ignored: str) -> str:
    """The target's fields but `name`, `out` and `ignored`, as one comparable text."""
    skip = {"name", "out", *ignored}
    return repr([(f.name, getattr(target, f.name)) for f in dataclasses.fields(target) if f.name not in skip])


# PlannedTensor's fields in the order its constructor takes them: `dataclasses.replace` without its per-call cost.
_FIELDS = [f.name for f in dataclasses.fields(PlannedTensor) if f.init]
assert not any(f.kw_only for f in dataclasses.fields(PlannedTensor)), "with_alphas passes every field by place"
_BEFORE = operator.attrgetter(*_FIELDS[: _FIELDS.index("terms")])
_AFTER = operator.attrgetter(*_FIELDS[_FIELDS.index("terms") + 1 :])
_PLUS, _MINUS = operator.itemgetter(1), operator.itemgetter(2)


def with_alphas(tensors: list[PlannedTensor], alphas: tuple[float, ...]) -> list[PlannedTensor]:
    """The plan of a target without alpha rules under other alphas: each combined tensor's terms take them."""
    found = []
    for t in tensors:
        if len(t.terms) == 1:  # one vector
            terms: tuple[Term, ...] = (make_term((alphas[0], t.terms[0][1], t.terms[0][2])),)
            t = make_planned(*_BEFORE(t), terms, *_AFTER(t))
        elif t.terms:
            terms = tuple(map(Term, alphas, map(_PLUS, t.terms), map(_MINUS, t.terms)))
            t = make_planned(*_BEFORE(t), terms, *_AFTER(t))
        found.append(t)
    return found


_SIGNATURE = operator.attrgetter("name", "shape", "out_dtype")
_SIGNATURE_AT_SHARDS = operator.attrgetter("name", "shape", "out_dtype", "rule")
_PLACE = operator.attrgetter("shard", "offset", "nbytes")


class Reuse:
    """The plans and layouts of a job's earlier targets."""

    def __init__(self) -> None:
        self.plans: dict[str, TargetTensors] = {}  # by inputs_key
        self.swept: dict[str, TargetTensors] = {}  # by inputs_key without alphas: targets without alpha rules
        self.layouts: dict[tuple, tuple[list[PlannedTensor], Layout]] = {}  # by each tensor's name, shape, dtype
        self.sides = Sides()  # each tensor's vector side, for every target (planning/vectors.py)

    def tensors(self, target: Target, make: Callable[[], TargetTensors]) -> TargetTensors:
        """`make()`'s result for this target, or an earlier equal target's."""
        key = inputs_key(target)
        if key in self.plans:
            return self.plans[key]
        sweep = inputs_key(target, "alphas") if not target.alpha_rules else None
        if sweep is not None and sweep in self.swept:
            tensors, rows = self.swept[sweep]
            found = (with_alphas(tensors, target.alphas), rows)
        else:
            found = make()
            if sweep is not None:
                self.swept[sweep] = found
        self.plans[key] = found
        return found

    def layout(self, tensors: list[PlannedTensor], max_shard_size: int, at_shards: bool) -> Layout:
        """`layout(tensors, max_shard_size, at_shards)`, from an earlier layout of the same names, shapes, dtypes
        and (for an object store) rules, which place an FP8 weight's scales."""
        key = (max_shard_size, at_shards, tuple(map(_SIGNATURE_AT_SHARDS if at_shards else _SIGNATURE, tensors)))
        if key not in self.layouts:
            self.layouts[key] = (tensors, layout(tensors, max_shard_size, at_shards))
            return self.layouts[key][1]
        earlier, lay = self.layouts[key]
        if all(map(operator.is_, earlier, tensors)):
            return lay
        return Layout([make_placed(t, *place) for t, place in zip(tensors, map(_PLACE, lay.tensors))], lay.shards)
