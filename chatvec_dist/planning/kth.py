"""TIES' exact k-th largest magnitude per tensor and vector, by a radix select over float32 bit patterns (no torch:
the driver merges the workers' histograms here).

A magnitude |Δ| rounded to float32 has its sign bit clear, so its bit pattern, read as an integer in [0, 2^31),
orders as the value does. Pass 1 counts the top 16 of those 31 bits (HIGH_BUCKETS) over the whole tensor; the
bucket holding the k-th largest follows. Pass 2 counts the low 15 bits (LOW_BUCKETS) of the elements in that
bucket only; the k-th largest bit pattern follows, exactly. Each histogram is a fixed size whatever the tensor's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .planner import Src
from .sparsity import TermDare

LOW_BITS = 15
HIGH_BUCKETS = 1 << (31 - LOW_BITS)
LOW_BUCKETS = 1 << LOW_BITS


@dataclass(frozen=True)
class SelectTensor:
    """One tensor whose vectors are histogrammed: each vector's sources and DARE, over its merged elements; in
    pass 2, the high buckets counted per vector."""

    name: str
    terms: tuple[tuple[Src, Src | None], ...]  # (plus, minus) per vector
    dare: tuple[TermDare | None, ...]
    merge_elems: int
    buckets: tuple[tuple[int, ...], ...] | None = None  # pass 2: per vector, the high buckets to count


@dataclass(frozen=True)
class SelectPass:
    """What a worker histograms instead of merging: tensors by their index in the layout."""

    tensors: dict[int, SelectTensor]


@dataclass(frozen=True)
class Histogram:
    """One piece's counts for (tensor, vector): pass 1 over the high bits (`bucket` −1), pass 2 over the low bits of
    the elements in high bucket `bucket`. Sparse: the nonzero buckets and their counts."""

    index: int
    term: int
    bucket: int
    buckets: np.ndarray  # int32
    counts: np.ndarray  # int64


def from_top(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest (1-based) of the counted values, and its rank within that bucket."""
    above = np.cumsum(counts[::-1])  # above[j]: values in the top j + 1 buckets
    j = int(np.searchsorted(above, k))  # the first j with above[j] ≥ k
    bucket = len(counts) - 1 - j
    return bucket, k - (int(above[j - 1]) if j else 0)


def threshold(high: int, low_counts: np.ndarray, rank: int) -> int:
    """The bit pattern of the rank-th largest value in high bucket `high`, from that bucket's low-bit counts."""
    low, _ = from_top(low_counts, rank)
    return high << LOW_BITS | low


class Accumulator:
    """Dense counts per (tensor, vector[, bucket]), each dropped as soon as its tensor's last piece reported: the
    driver holds only the tensors still being counted (about two per worker), not one per tensor."""

    def __init__(self, pieces: dict[int, int], size: int) -> None:
        self.left = dict(pieces)  # pieces still to report, per tensor
        self.size = size
        self.counts: dict[tuple[int, int, int], np.ndarray] = {}

    def add(self, index: int, hists: list[Histogram]) -> dict[tuple[int, int], np.ndarray] | None:
        """Add one piece's histograms of tensor `index`; where that was its last piece, return its totals by
        (vector, bucket) and forget them."""
        for h in hists:
            total = self.counts.setdefault((index, h.term, h.bucket), np.zeros(self.size, dtype=np.int64))
            np.add.at(total, h.buckets, h.counts)
        self.left[index] -= 1
        if self.left[index]:
            return None
        done = {(t, b): c for (i, t, b), c in self.counts.items() if i == index}
        for t, b in done:
            del self.counts[(index, t, b)]
        return done
