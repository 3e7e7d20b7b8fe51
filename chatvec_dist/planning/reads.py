"""The sources a plan's tensors read, gathered column by column (C-level `map`s over all tensors at once): CP's,
the vectors' plus and minus, and the token rows' chat tensor. The targets of a batch share their `Src` objects
(an alpha sweep all of them; planning/reuse.py), so a column that is element-wise the very objects of the same
column of the layout before is taken as it is: the sources of all targets cost about one target's, not a Python
loop per target per tensor per source."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from itertools import chain
from operator import attrgetter, is_, is_not
from typing import cast

from .layout import Layout
from .planner import Src

_TENSOR = attrgetter("tensor")
_TERMS = attrgetter("terms")
_CP = attrgetter("cp")
_ROW_SRC = attrgetter("row_src")
_PLUS = attrgetter("plus")
_MINUS = attrgetter("minus")
_FILES = attrgetter("files")
_PATH = attrgetter("path")
_NOT_NONE = partial(is_not, None)

# One source column of a layout (None where a tensor has no such source), and whether it is new: not element-wise
# the very objects of that column of the layout before.
Column = tuple[list[Src | None], bool]


def read_srcs(layouts: Iterable[Layout]) -> list[Src]:
    """Every source the layouts' tensors read (each one's `PlannedTensor.srcs`), each object once."""
    found: dict[int, Src] = {}
    for columns in _source_columns(layouts):
        for srcs, new in columns:
            if new:
                present = cast(list[Src], list(filter(_NOT_NONE, srcs)))
                found.update(zip(map(id, present), present))
    return list(found.values())


def read_files(srcs: Iterable[Src]) -> set[str]:
    """Every file the sources read (each one's `Src.files`)."""
    return set(chain.from_iterable(map(_FILES, srcs)))


def read_paths(layouts: Iterable[Layout]) -> list[set[str]]:
    """Each layout's sources' own paths (each `Src.path`: the first file it reads)."""
    found = []
    paths: list[set[str]] = [set()] * 4  # each column's
    for columns in _source_columns(layouts):
        paths = [set(map(_PATH, filter(_NOT_NONE, srcs))) if new else p for (srcs, new), p in zip(columns, paths)]
        found.append(set().union(*paths))
    return found


def _source_columns(layouts: Iterable[Layout]) -> Iterator[list[Column]]:
    """Each layout's source columns."""
    last: list[list[Src | None]] = [[], [], [], []]
    for layout in layouts:
        tensors = list(map(_TENSOR, layout.tensors))
        terms = list(chain.from_iterable(map(_TERMS, tensors)))
        columns = []
        gathered = (map(_CP, tensors), map(_PLUS, terms), map(_MINUS, terms), map(_ROW_SRC, tensors))
        for k, srcs in enumerate(map(list, gathered)):
            same = len(srcs) == len(last[k]) and all(map(is_, srcs, last[k]))
            last[k] = last[k] if same else srcs
            columns.append((last[k], not same))
        yield columns
