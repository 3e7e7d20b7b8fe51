"""Handing units to nodes: contiguous runs per node, stealing the back half of the longest run, retries."""
from __future__ import annotations

from chatvec_dist.exec.node_queues import NodeQueues
from chatvec_dist.planning.layout import Piece, Unit


def units(n: int) -> list[Unit]:
    return [Unit(i, (Piece(i, 0, 1),), 1) for i in range(n)]


def drain(queues: NodeQueues, order: list[str]) -> dict[str, list[int]]:
    """Nodes ask in turn (`order` repeated) until nothing is left; each node's unit ids, in the order taken."""
    got: dict[str, list[int]] = {n: [] for n in order}
    while len(queues):
        for node in order:
            unit = queues.take(node)
            if unit is not None:
                got[node].append(unit.id)
    return got


def runs(ids: list[int]) -> int:
    return sum(1 for k, i in enumerate(ids) if k == 0 or i != ids[k - 1] + 1)


def test_two_nodes_split_the_units_into_two_runs():
    got = drain(NodeQueues(units(100)), ["a", "b"])
    assert got == {"a": list(range(50)), "b": list(range(50, 100))}


def test_every_unit_once_and_few_runs_per_node_when_speeds_differ():
    queues = NodeQueues(units(1000))
    got = drain(queues, ["fast", "fast", "fast", "slow", "mid", "mid"])
    assert sorted(i for ids in got.values() for i in ids) == list(range(1000))
    assert len(got["fast"]) > len(got["mid"]) > len(got["slow"]) > 0
    assert all(runs(ids) <= 12 for ids in got.values()), {n: runs(ids) for n, ids in got.items()}
    assert queues.take("fast") is None and queues.take("new") is None


def test_a_retried_unit_is_redone_first_on_its_node_or_by_another_if_the_node_is_gone():
    queues = NodeQueues(units(10))
    first = queues.take("a")
    queues.retry(first, "a")
    assert queues.take("a") is first
    lost = queues.take("a")
    queues.retry(lost, "gone")
    got = drain(queues, ["a", "b"])
    assert lost.id == 1 and sorted(got["a"] + got["b"]) == list(range(1, 10))
