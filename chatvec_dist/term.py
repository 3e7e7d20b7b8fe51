"""`Term`: one chat vector's share of a merge, `alpha · (plus − minus)`."""

from __future__ import annotations

from typing import Any, NamedTuple


class Term(NamedTuple):
    """`alpha · (plus − minus)`: plus is a chat model and minus its base, or plus an extracted vector and minus None.

    One shape at every level: checkpoints when planning, tensor sources in the plan, tensors in the kernels.
    """

    alpha: float
    plus: Any
    minus: Any  # None for an extracted vector
