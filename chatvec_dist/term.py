"""`Term`: one chat vector's share of a merge, `alpha · (plus − minus)`."""

from __future__ import annotations

from typing import Any, NamedTuple

from .quickinit import tuple_maker


class Term(NamedTuple):
    """`alpha · (plus − minus)`: plus is a chat model and minus its base, or plus an extracted vector and minus None.

    One shape at every level: checkpoints when planning, tensor sources in the plan, tensors in the kernels.
    """

    alpha: float
    plus: Any
    minus: Any  # None for an extracted vector


make_term = tuple_maker(Term)  # Term((alpha, plus, minus)) in C: by the hundred thousand in a plan
