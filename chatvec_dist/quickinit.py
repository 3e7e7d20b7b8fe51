"""Frozen, slotted dataclasses built at about half the cost: a plan of 45 k tensors makes half a million of them
(each header entry, tensor reference, source, planned and placed tensor).

A frozen dataclass's `__init__` sets each field by `object.__setattr__(self, name, value)`, which finds the
field's slot by name on every call. `quick_init` gives the class an `__init__` that calls each slot's own
setter instead: the same parameters, defaults and fields, the class as frozen as before (its `__setattr__` is
untouched), 0.35 µs instead of 0.6 for 5 fields, 0.62 instead of 1.2 for 12 (Python 3.11)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def quick_init(cls: type[T]) -> type[T]:
    """Replace the `__init__` of a frozen dataclass made with `slots=True` by one that sets each slot directly.
    Only plain fields are taken (positional or keyword, with or without a default value): the decorator refuses
    a class whose `__init__` does more (a default factory, an init-only or keyword-only field, `__post_init__`)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: quick_init takes a frozen dataclass made with slots=True")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type] # a dataclass, checked above
    plain = all(f.init and f.default_factory is dataclasses.MISSING and not f.kw_only for f in fields)
    if not plain or len(fields) != len(cls.__dataclass_fields__) or hasattr(cls, "__post_init__"):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: quick_init takes plain fields only")
    env = {f"_set_{f.name}": _slot(cls, f.name).__set__ for f in fields}
    env.update({f"_dflt_{f.name}": f.default for f in fields if f.default is not dataclasses.MISSING})
    args = [f.name if f.default is dataclasses.MISSING else f"{f.name}=_dflt_{f.name}" for f in fields]
    body = "".join(f"        _set_{f.name}(self, {f.name})\n" for f in fields) or "        pass\n"
    source = f"def make({', '.join(env)}):\n    def __init__(self, {', '.join(args)}):\n{body}    return __init__\n"
    namespace: dict[str, object] = {}
    exec(source, {}, namespace)  # noqa: S102 -- field names only: identifiers, as dataclasses itself does
    init = namespace["make"](**env)  # type: ignore[operator]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


def _slot(cls: type, name: str) -> Any:
    """The slot descriptor of field `name` (in the class or the base that declares it)."""
    return next(k.__dict__[name] for k in cls.__mro__ if name in k.__dict__)
