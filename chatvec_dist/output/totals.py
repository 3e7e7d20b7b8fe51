"""One output's per-tensor totals as columns (an array per field): the manifest's measured columns are made of them
in a few C calls, and a unit's tensors complete with one segment each are stored by fancy indexing."""

from __future__ import annotations

import numpy as np

from ..kernels.stats import Stats

FLOAT_STATS = ("cp_sq", "delta_sq", "update_sq")  # the Stats fields kept as float64 columns
INT_STATS = ("nan", "inf", "agree", "signed")  # and as int64 columns (`kept`: a list per tensor)


class Totals:
    """Per tensor: its hash and its sources' (None until complete), the Stats fields summed over its pieces, the
    seconds of its pieces and the workers and nodes that made them (a comma-joined sorted list where several), as
    codes of `names`."""

    def __init__(self, n: int) -> None:
        self.done = np.zeros(n, bool)
        self.hashes = np.full(n, None, object)
        self.source_hashes = np.fromiter([()] * n, object, n)  # per source (`extents` order)
        self.cp_sq, self.delta_sq, self.update_sq = (np.zeros(n, np.float64) for _ in FLOAT_STATS)
        self.nan, self.inf, self.agree, self.signed = (np.zeros(n, np.int64) for _ in INT_STATS)
        self.seconds = np.zeros(n, np.float64)
        self.kept: list[list[int]] = [[]] * n  # per vector (DARE, TIES); each list replaced, never changed
        self.names: dict[str, int] = {}  # the workers' and nodes' names, by their code in `worker` and `node`
        self.worker = np.zeros(n, np.int32)
        self.node = np.zeros(n, np.int32)

    def __len__(self) -> int:
        return len(self.done)

    def code(self, name: str) -> int:
        """`name`'s code in `worker` and `node` (a few names per run: a column of them is a take)."""
        return self.names.setdefault(name, len(self.names))

    def set(
        self, i: int, hash: str, sources: tuple[str | None, ...], stats: Stats, seconds: float, worker: str, node: str
    ) -> None:
        """Tensor `i` complete (one at a time: a tensor of several blocks, folded)."""
        self.done[i], self.hashes[i], self.source_hashes[i] = True, hash, sources
        for name in FLOAT_STATS + INT_STATS:
            getattr(self, name)[i] = getattr(stats, name)
        self.kept[i] = stats.kept
        self.seconds[i], self.worker[i], self.node[i] = seconds, self.code(worker), self.code(node)

    def nonfinite(self) -> np.ndarray:
        """The complete tensors that hold NaN or Inf."""
        return np.flatnonzero(self.done & ((self.nan != 0) | (self.inf != 0)))
