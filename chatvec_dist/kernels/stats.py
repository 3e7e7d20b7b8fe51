"""What a kernel reports besides the bytes: norms and non-finite counts (no torch: the driver sums them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from operator import itemgetter


@dataclass
class Stats:
    """Sums of squares in float64 and non-finite counts of one piece of output; under DARE or TIES, each vector's
    kept elements, and (TIES) the nonzero kept entries and those agreeing with the elected sign."""

    cp_sq: float = 0.0
    delta_sq: float = 0.0
    update_sq: float = 0.0
    nan: int = 0
    inf: int = 0
    kept: list[int] = field(default_factory=list)  # per vector; empty without DARE or TIES
    agree: int = 0
    signed: int = 0

    def add(self, other: Stats) -> None:
        self.cp_sq += other.cp_sq
        self.delta_sq += other.delta_sq
        self.update_sq += other.update_sq
        self.nan += other.nan
        self.inf += other.inf
        if other.kept:
            self.kept = [a + b for a, b in zip(self.kept or [0] * len(other.kept), other.kept)]
        self.agree += other.agree
        self.signed += other.signed


STATS_FIELDS = tuple(f.name for f in fields(Stats))
_GETTERS = [itemgetter(name) for name in STATS_FIELDS]  # of a Stats' __dict__ (a third faster than getattr)


def stats_columns(stats: Sequence[Stats]) -> list[list]:
    """Each Stats field's values (`STATS_FIELDS` order), an item per Stats: `Stats(*row)` makes them again."""
    found = list(map(vars, stats))
    return [list(map(get, found)) for get in _GETTERS]
