"""`quick_init` makes the objects the dataclass's own `__init__` makes: same fields, defaults, equality, hash, repr,
pickling, and just as frozen; it refuses a class whose `__init__` does more than set fields."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field

import pytest

from chatvec_dist.io.checkpoint import TensorRef
from chatvec_dist.io.header import OutEntry, TensorInfo
from chatvec_dist.planning.layout import Piece, Placed, Unit
from chatvec_dist.planning.planner import PlannedTensor, Src
from chatvec_dist.quickinit import maker, quick_init, tuple_maker


class Base:
    __slots__ = ("extra",)


@dataclass(frozen=True, slots=True)
class Plain(Base):
    name: str
    shape: tuple[int, ...]
    start: int = 0
    rows: tuple = ()
    src: object = None


@quick_init
@dataclass(frozen=True, slots=True)
class Quick(Base):
    name: str
    shape: tuple[int, ...]
    start: int = 0
    rows: tuple = ()
    src: object = None


def _fields(obj: object) -> tuple:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("w", (2, 3)), {}),
        (("w", (2,), 5, ((0, 1),), "s"), {}),
        (("w",), {"shape": (1,), "src": 7}),
        ((), {"name": "n", "shape": ()}),
    ],
)
def test_quick_objects_are_the_dataclass_objects(args: tuple, kwargs: dict):
    slow, quick = Plain(*args, **kwargs), Quick(*args, **kwargs)
    assert _fields(quick) == _fields(slow)
    assert repr(quick) == repr(slow).replace("Plain", "Quick")
    assert quick == Quick(*args, **kwargs) and hash(quick) == hash(Quick(*args, **kwargs)) == hash(_fields(slow))
    assert quick != Quick("other", (9,))
    assert pickle.loads(pickle.dumps(quick)) == quick
    assert dataclasses.replace(quick, start=42).start == 42
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.name = "x"  # type: ignore[misc]
    assert not hasattr(quick, "extra")  # a base's slot stays unset, as the dataclass leaves it


make_quick = maker(Quick)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("w", (2, 3)), {}),
        (("w", (2,), 5, ((0, 1),), "s"), {}),
        (("w",), {"shape": (1,), "src": 7}),
    ],
)
def test_a_maker_makes_the_class_objects(args: tuple, kwargs: dict):
    made, quick, slow = make_quick(*args, **kwargs), Quick(*args, **kwargs), Plain(*args, **kwargs)
    assert type(made) is Quick
    assert made == quick and hash(made) == hash(quick) and repr(made) == repr(quick)
    assert _fields(made) == _fields(slow)
    assert pickle.loads(pickle.dumps(made)) == made
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.start = 1  # type: ignore[misc]
    assert not hasattr(made, "extra")


def test_a_missing_or_unknown_argument_is_refused():
    with pytest.raises(TypeError):
        Quick("w")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Quick("w", (1,), nope=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Quick("w", (1,), 0, (), None, "sixth")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        make_quick("w")


def _made(frozen: bool, slots: bool, **namespace: object) -> type:
    """A dataclass of one field `a`, with `namespace` in its class body."""
    return dataclass(frozen=frozen, slots=slots)(type("C", (), {"__annotations__": {"a": int}, **namespace}))


@pytest.mark.parametrize(
    "cls",
    [
        _made(frozen=False, slots=True),
        _made(frozen=True, slots=False),
        _made(frozen=True, slots=True, a=field(default_factory=list)),
        _made(frozen=True, slots=True, a=field(kw_only=True)),
        _made(frozen=True, slots=True, __post_init__=lambda self: None),
        int,
    ],
)
def test_a_class_it_cannot_make_alike_is_refused(cls: type):
    with pytest.raises(TypeError, match="quick_init takes"):
        quick_init(cls)
    with pytest.raises(TypeError, match="quick_init takes"):
        maker(cls)


@pytest.mark.parametrize("cls", [TensorInfo, OutEntry, TensorRef, Src, PlannedTensor, Placed, Piece, Unit])
def test_the_planning_classes_are_quick_and_keep_their_fields(cls: type):
    assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
    assert "_set_" in " ".join(cls.__init__.__code__.co_freevars)
    names = [f.name for f in dataclasses.fields(cls)]
    assert list(cls.__init__.__code__.co_varnames[1 : 1 + len(names)]) == names


def test_the_planning_makers_make_their_classes():
    from chatvec_dist.io.checkpoint import _make_ref
    from chatvec_dist.io.header import _make_info
    from chatvec_dist.planning.layout import make_placed
    from chatvec_dist.planning.planner import _make_src, make_planned

    info = _make_info("w", "F32", (2,), 8, 16)
    assert type(info) is TensorInfo and info == TensorInfo("w", "F32", (2,), 8, 16)
    ref = _make_ref("/f", info)
    assert type(ref) is TensorRef and ref == TensorRef("/f", info)
    src = _make_src("/f", 8, "F32")
    assert type(src) is Src and src == Src("/f", 8, "F32") and hash(src) == hash(Src("/f", 8, "F32"))
    planned = make_planned("w", "merge", "", (2,), "F32", src, (), 2)
    assert type(planned) is PlannedTensor and planned == PlannedTensor("w", "merge", "", (2,), "F32", src, (), 2)
    assert planned.srcs == (src,)  # the derived slots are filled on first use, as for any PlannedTensor
    placed = make_placed(planned, 0, 64, 8)
    assert type(placed) is Placed and placed == Placed(planned, 0, 64, 8)
    for made in (info, ref, src, planned, placed):  # as a Ray unit's context carries them
        assert pickle.loads(pickle.dumps(made)) == made


def test_a_tuple_maker_makes_the_named_tuple_its_class_makes():
    from chatvec_dist.kernels.stats import Stats
    from chatvec_dist.output.manifest import Part
    from chatvec_dist.term import Term, make_term

    made = make_term((0.5, "plus", None))
    assert type(made) is Term and made == Term(0.5, "plus", None) and made.alpha == 0.5 and made.minus is None
    part = tuple_maker(Part)((Stats(1.0), 1.5, "w", "n"))
    assert type(part) is Part and part == Part(Stats(1.0), 1.5, "w", "n") and part.worker == "w"
