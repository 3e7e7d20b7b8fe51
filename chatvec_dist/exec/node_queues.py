"""Which unit a node gets next: each node works through its own contiguous run of units.

Units follow the tensor order, so neighbouring units read neighbouring bytes of the same input files: a node
that keeps to one run finds its inputs in its own page cache, and on a cluster reading from the Hub it
downloads only the files of its runs. A node whose run is empty takes the back half of the longest run left
(all of the units nobody owns yet, at first), so work stays balanced to the last unit.
"""
from __future__ import annotations

from collections import deque

from ..planning.layout import Unit

UNOWNED = ""  # the run of units no node has taken yet


class NodeQueues:
    def __init__(self, units: list[Unit]) -> None:
        self._runs: dict[str, deque[Unit]] = {UNOWNED: deque(units)}

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs.values())

    def take(self, node: str) -> Unit | None:
        """The next unit for a worker on `node`, or None when every unit has been handed out."""
        run = self._runs.setdefault(node, deque())
        if not run:
            donor_node, donor = max(((n, r) for n, r in self._runs.items() if n != node), key=lambda nr: len(nr[1]),
                                    default=(UNOWNED, deque()))
            keep = 0 if donor_node == UNOWNED else len(donor) // 2
            while len(donor) > keep:
                run.appendleft(donor.pop())
        return run.popleft() if run else None

    def retry(self, unit: Unit, node: str) -> None:
        """A unit whose worker died goes back to the front of that node's run (others take it if the node is gone)."""
        self._runs.setdefault(node, deque()).appendleft(unit)
