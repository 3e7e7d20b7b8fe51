"""Each tensor's alphas under a target's alpha rules: the first rule whose regex matches its name, a gradient read at
the tensor's layer within its tower (mergekit's convention)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import PlanError
from ..recipe.alpha_rules import Alpha, AlphaRule
from ..recipe.spec import Target

if TYPE_CHECKING:
    from .plan import TargetPlan

# A layer's index in a tensor name: Llama/Mistral/Qwen/GPT-NeoX `layers.N.`, BERT `layer.N.`, GPT-2/BLOOM/Falcon
# `h.N.`, MPT/OLMo/Qwen-VL's vision `blocks.N.`, T5 `block.N.` (its `layer.M.` inside is a sublayer: the first wins).
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")


def layer_of(name: str) -> tuple[str, int] | None:
    """(tower, layer index) of a tensor: the tower is the name up to the index (`model.encoder.layers.` and
    `model.decoder.layers.` count their layers apart), or None for a tensor outside the layers."""
    m = LAYER.search(name)
    return (name[: m.start(1)], int(m.group(1))) if m else None


def towers(names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Each tower's first and last layer index."""
    found: dict[str, tuple[int, int]] = {}
    for name in names:
        at = layer_of(name)
        if at is not None:
            tower, i = at
            first, last = found.get(tower, (i, i))
            found[tower] = (min(first, i), max(last, i))
    return found


def gradient(points: tuple[float, ...], t: float) -> float:
    """The value at position t ∈ [0, 1] of points spread evenly over [0, 1], linear in between (mergekit's
    `evaluate_setting`, in its arithmetic)."""
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * points[i0] + frac * points[i1]


def position(layer: int, first: int, last: int) -> float:
    """A layer's place in its tower: 0 at the first, 1 at the last (1 for a tower of one layer, as mergekit)."""
    return (layer - first) / (last - first) if last > first else 1.0


def rule_for(rules: tuple[AlphaRule, ...], name: str) -> int | None:
    """The index of the first rule matching `name`, or None."""
    return next((i for i, r in enumerate(rules) if re.search(r.match, name)), None)


def tensor_alphas(
    target: Target, names: Iterable[str], combined: Iterable[str], file_of: dict[str, str]
) -> dict[str, tuple[float, ...]]:
    """The alphas of each `combined` tensor a rule picks (the others keep the target's). `names`: every tensor
    name of the output (CP's; a rule must match one; the towers span all layers); `file_of`: a tensor's file, for
    errors. Raises PlanError."""
    rules = target.alpha_rules
    if not rules:
        return {}
    names = list(names)
    for rule in rules:
        if not any(re.search(rule.match, n) for n in names):
            raise PlanError(
                f"alpha rule {rule.match!r} matches no tensor of target '{target.name}' (a typo? rules match the "
                "output's names: CP's, where a vector stores MoE experts in another layout)"
            )
    spans = towers(names)
    chosen = {}
    for name in combined:
        i = rule_for(rules, name)
        if i is not None:
            chosen[name] = tuple(_alpha(a, rules[i], name, spans, file_of.get(name)) for a in rules[i].alphas)
    return chosen


def _alpha(a: Alpha, rule: AlphaRule, name: str, spans: dict[str, tuple[int, int]], file: str | None) -> float:
    if not isinstance(a, tuple):
        return a
    at = layer_of(name)
    if at is None:
        raise PlanError(
            f"alpha rule {rule.match!r} is a gradient over layers, but this tensor has no layer index "
            "(give it an earlier rule, or a regex that matches layers only)",
            file=file,
            tensor=name,
        )
    tower, layer = at
    return gradient(a, position(layer, *spans[tower]))


def shown(alphas: tuple[Alpha, ...]) -> str:
    """A rule's alphas as YAML writes them: `[0.0]`, `[[0.5, 1.0]]`."""
    return str([list(a) if isinstance(a, tuple) else a for a in alphas])


def rule_lines(tp: TargetPlan) -> list[str]:
    """`chatvec plan`'s lines on a target's alpha rules: how many combined tensors each rule picked (the rest get
    the target's alphas), and the range of the alphas they got, per vector."""
    rules = tp.target.alpha_rules
    if not rules:
        return []
    picked: dict[int | None, list[tuple[float, ...]]] = {}
    for p in tp.layout.tensors:
        if p.tensor.terms:
            picked.setdefault(rule_for(rules, p.tensor.name), []).append(tuple(t.alpha for t in p.tensor.terms))
    lines = []
    labels = [f"alpha rule '{r.match}' → {shown(r.alphas)}" for r in rules] + [f"other → {list(tp.target.alphas)}"]
    for i, label in zip([*range(len(rules)), None], labels):
        got = picked.get(i, [])
        lo, hi = ([min(col) for col in zip(*got)], [max(col) for col in zip(*got)]) if got else ([], [])
        span = f", alphas from {lo} to {hi}" if lo != hi else ""
        lines.append(f"  {label}: {len(got)} tensor{'s' * (len(got) != 1)}{span}")
    return lines
