"""Alpha rules: per-tensor alphas chosen by name (`norm` → 0), or a gradient over the layers (mergekit's)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

Alpha = float | tuple[float, ...]  # one vector's alpha: a value, or a gradient's points (two or more)


@dataclass(frozen=True)
class AlphaRule:
    """Tensors whose name matches `match` (a Python regex, `re.search`) get `alphas` instead of the target's, one
    entry per vector (one for all is broadcast by Target): a number, or a gradient, its points spread evenly from a
    model tower's first layer to its last, linear in between. A target's first matching rule wins."""

    match: str
    alphas: tuple[Alpha, ...]

    def __post_init__(self) -> None:
        alphas = self.alphas if isinstance(self.alphas, (list, tuple)) else (self.alphas,)  # a number: for all
        value = tuple(tuple(a) if isinstance(a, (list, tuple)) else a for a in alphas)  # lists (YAML) as tuples
        object.__setattr__(self, "alphas", value)


def problem(rule: AlphaRule, n_vectors: int, limit: float) -> str | None:
    """What is wrong with a rule for a target of `n_vectors` vectors (alphas within ±`limit`), or None."""
    if not isinstance(rule.match, str):
        return f"alpha rule match {rule.match!r}: give a regex as text"
    try:
        re.compile(rule.match)
    except (re.error, OverflowError, RecursionError) as e:  # a repeat count too large, nesting too deep
        return f"alpha rule {rule.match!r}: not a valid regex ({e})"
    where = f"alpha rule {rule.match!r}"
    if len(rule.alphas) not in (1, n_vectors):
        return f"{where}: give one alpha (for every vector) or one per vector ({n_vectors}), e.g. alphas=(0.0,)"
    for a in rule.alphas:
        points = a if isinstance(a, tuple) else (a,)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in points):
            return f"{where}: alphas {list(rule.alphas)!r}: give numbers, or lists of them (gradients)"
        if isinstance(a, tuple) and len(a) < 2:
            return f"{where}: a gradient needs two points or more (first layer, ..., last layer): {list(a)}"
        if not all(math.isfinite(v) and abs(v) <= limit for v in points):
            return f"{where}: alphas {list(rule.alphas)} must be finite numbers within float32's range"
    return None


def broadcast(rule: AlphaRule, n_vectors: int) -> AlphaRule:
    """The rule with one entry per vector, as floats."""
    alphas = tuple(tuple(float(v) for v in a) if isinstance(a, tuple) else float(a) for a in rule.alphas)
    return AlphaRule(rule.match, alphas * n_vectors if len(alphas) == 1 else alphas)


def parse_alpha_rule(text: str) -> AlphaRule:
    """`REGEX=A` or `REGEX=A0:A1:…` (a gradient), for every vector (the regex may hold `=`: the last one splits).
    Raises ValueError."""
    match, sep, value = text.rpartition("=")
    if not sep or not match:
        raise ValueError(f"--alpha-rule {text!r}: give REGEX=A or REGEX=A0:A1:... (a gradient), e.g. 'norm=0'")
    try:
        points = tuple(float(v) for v in value.split(":"))
    except ValueError:
        raise ValueError(f"--alpha-rule {text!r}: {value!r} is not a number or numbers separated by ':'") from None
    return AlphaRule(match, (points if len(points) > 1 else points[0],))
