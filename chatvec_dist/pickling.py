"""Pickling of the plan's small frozen dataclasses wherever they are pickled (a unit and its pieces sent to a Ray
worker; a unit's placed tensors themselves travel as columns: exec/context_columns.py)."""

from __future__ import annotations

import dataclasses
from operator import attrgetter
from typing import Any, TypeVar

T = TypeVar("T")


def by_fields(cls: type[T]) -> type[T]:
    """Pickle a frozen dataclass as its class and its fields' values (gathered in one C call), made again through
    `__init__`. For `slots=True` classes, dataclasses' own `__getstate__`/`__setstate__` call `fields()` for each
    object (1.3 of the 2.2 s that pickling a 45 k-tensor unit's placed tensors took that way)."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    assert len(fields) > 1 and all(f.init for f in fields), cls  # a tuple of values, each an argument of __init__
    values = attrgetter(*(f.name for f in fields))

    def __reduce__(self: Any) -> tuple[type[T], tuple]:
        return cls, values(self)

    cls.__reduce__ = __reduce__  # type: ignore[method-assign]
    return cls
