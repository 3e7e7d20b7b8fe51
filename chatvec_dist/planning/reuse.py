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
from ..term import Term
from .layout import Layout, Placed, layout
from .planner import PlannedTensor
from .tokens import TokenRow
from .vectors import Sides

# A target's planned tensors (before layout) and its token rows.
TargetTensors = tuple[list[PlannedTensor], tuple[TokenRow, ...]]


def inputs_key(target: Target, *ignored: str) -> str:
    """The target's fields but `name`, `out` and `ignored`, as one comparable text."""
    skip = {"name", "out", *ignored}
    return repr([(f.name, getattr(target, f.name)) for f in dataclasses.fields(target) if f.name not in skip])


# PlannedTensor's fields in the order its constructor takes them: `dataclasses.replace` without its per-call cost.
_FIELDS = [f.name for f in dataclasses.fields(PlannedTensor) if f.init and not f.kw_only]
_KEYWORDS = [f.name for f in dataclasses.fields(PlannedTensor) if f.init and f.kw_only]
_VALUES = operator.attrgetter(*_FIELDS)
_TERMS = _FIELDS.index("terms")


def with_alphas(tensors: list[PlannedTensor], alphas: tuple[float, ...]) -> list[PlannedTensor]:
    """The plan of a target without alpha rules under other alphas: each combined tensor's terms take them."""
    found = []
    for t in tensors:
        if t.terms:
            values = list(_VALUES(t))
            values[_TERMS] = tuple(Term(a, p, m) for a, (_, p, m) in zip(alphas, t.terms))
            t = PlannedTensor(*values, **{k: getattr(t, k) for k in _KEYWORDS})
        found.append(t)
    return found


class Reuse:
    """The plans and layouts of a job's earlier targets."""

    def __init__(self) -> None:
        self.plans: dict[str, TargetTensors] = {}  # by inputs_key
        self.swept: dict[str, TargetTensors] = {}  # by inputs_key without alphas: targets without alpha rules
        self.layouts: dict[tuple, tuple[list[PlannedTensor], Layout]] = {}
        self.sides = (
            Sides()
        )  # each tensor's vector side, for every target (planning/vectors.py)  # by each tensor's name, shape, dtype

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
        signature = ((t.name, t.shape, t.out_dtype, t.rule if at_shards else "") for t in tensors)
        key = (max_shard_size, at_shards, tuple(signature))
        if key not in self.layouts:
            self.layouts[key] = (tensors, layout(tensors, max_shard_size, at_shards))
            return self.layouts[key][1]
        earlier, lay = self.layouts[key]
        if all(map(operator.is_, earlier, tensors)):
            return lay
        return Layout([Placed(t, p.shard, p.offset, p.nbytes) for t, p in zip(tensors, lay.tensors)], lay.shards)
