"""The vectors' side of each tensor (its chat and base entries and their sources), found once per job for every
target that combines the same vector checkpoints: a batch of outputs with other CPs pairs the vectors alike."""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import repeat
from typing import TYPE_CHECKING

from ..io.checkpoint import Checkpoint, TensorRef
from .experts import MappedRef

if TYPE_CHECKING:
    from .planner import Sources, Src


_SHAPE = operator.attrgetter("info.shape")


class Side:
    """One tensor's vector entries: each term's plus and minus (None where a checkpoint lacks it), and the
    sources and facts the planner asks of them, each made on first use."""

    __slots__ = ("pairs", "vecs", "_srcs", "_alike", "_mapped")

    def __init__(self, name: str, terms: tuple) -> None:
        self.pairs = [(plus.tensors.get(name), minus.tensors.get(name) if minus else None) for _, plus, minus in terms]
        self.vecs: list[TensorRef] = [v for pair in self.pairs for v in pair if v is not None]
        self._srcs: list[tuple[Src, Src | None]] | None = None
        self._alike: bool | None = None
        self._mapped: bool | None = None

    def srcs(self, make: Callable[[TensorRef], Src]) -> list[tuple[Src, Src | None]]:
        """Each term's plus and minus source, by `make` (every term has its plus here: the name sets were
        checked)."""
        if self._srcs is None:
            self._srcs = [(make(plus), make(minus) if minus else None) for plus, minus in self.pairs]
        return self._srcs

    def alike(self) -> bool:
        """Whether every vector entry has the first one's shape."""
        if self._alike is None:
            shapes = list(map(_SHAPE, self.vecs))
            self._alike = shapes.count(shapes[0]) == len(shapes)
        return self._alike

    def mapped(self) -> bool:
        """Whether an entry is read from the other MoE experts layout."""
        if self._mapped is None:
            self._mapped = any(map(isinstance, self.vecs, repeat(MappedRef)))
        return self._mapped


class Sides:
    """Each tensor's Side, kept per tuple of vector checkpoints (the objects: a target whose experts were mapped
    or scales stripped has checkpoints of its own, and sides of its own)."""

    def __init__(self) -> None:
        self.kept: list[tuple[tuple[Checkpoint | None, ...], dict[str, Side]]] = []

    def of(self, sources: Sources) -> dict[str, Side]:
        """The sides for these sources' vector checkpoints, filled as the planner asks."""
        ckpts = tuple(c for _, plus, minus in sources.terms for c in (plus, minus))
        for kept, sides in self.kept:
            if len(kept) == len(ckpts) and all(a is b for a, b in zip(kept, ckpts)):
                return sides
        self.kept.append((ckpts, {}))
        return self.kept[-1][1]


def side(sides: dict[str, Side], name: str, sources: Sources) -> Side:
    """The vector side of tensor `name` (as the vectors call it)."""
    found = sides.get(name)
    if found is None:
        found = sides[name] = Side(name, sources.terms)
    return found
