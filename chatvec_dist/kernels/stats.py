"""What a kernel reports besides the bytes: norms and non-finite counts (no torch: the driver sums them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    """Sums of squares in float64 and non-finite counts of one piece of output."""

    cp_sq: float = 0.0
    delta_sq: float = 0.0
    update_sq: float = 0.0
    nan: int = 0
    inf: int = 0

    def add(self, other: Stats) -> None:
        self.cp_sq += other.cp_sq
        self.delta_sq += other.delta_sq
        self.update_sq += other.update_sq
        self.nan += other.nan
        self.inf += other.inf
