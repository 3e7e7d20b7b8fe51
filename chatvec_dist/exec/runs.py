"""Which unit a worker gets next: each worker works through its own contiguous run of units.

Units follow the tensor order, so a run reads neighbouring bytes of the same input files and writes one region
of the output shards: reads stay sequential (readahead works, on cold storage too), workers seldom write the
same file at once, and since a worker stays on its node, a node's inputs stay in its page cache and Hub files
fetched per node are only those of its workers' runs. A worker whose run is empty takes the back half of the
longest run left (all of the units nobody owns yet, at first), so work stays balanced to the last unit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from ..planning.layout import Unit

UNOWNED = object()  # the run of units no worker has taken yet


class Runs:
    def __init__(self, units: list[Unit]) -> None:
        self._runs: dict[Hashable, deque[Unit]] = {UNOWNED: deque(units)}

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs.values())

    def take(self, worker: Hashable) -> Unit | None:
        """The next unit for `worker`, or None when every unit has been handed out."""
        run = self._runs.setdefault(worker, deque())
        if not run:
            owner, donor = max(((w, r) for w, r in self._runs.items() if w != worker), key=lambda wr: len(wr[1]))
            keep = 0 if owner is UNOWNED else len(donor) // 2
            while len(donor) > keep:
                run.appendleft(donor.pop())
        return run.popleft() if run else None

    def retry(self, unit: Unit, worker: Hashable) -> None:
        """A unit whose worker died goes back to the front of that worker's run, where the others take it."""
        self._runs.setdefault(worker, deque()).appendleft(unit)
