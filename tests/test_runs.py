"""Handing units to workers: a contiguous run each, stealing the back half of the longest run, retries."""

from __future__ import annotations

from chatvec_dist.exec.runs import Runs
from chatvec_dist.planning.layout import Piece, Unit


def units(n: int) -> list[Unit]:
    return [Unit(i, (Piece(i, 0, 1),), 1) for i in range(n)]


def drain(runs_: Runs, order: list[str]) -> dict[str, list[int]]:
    """Workers ask in turn (`order` repeated) until nothing is left; each worker's unit ids, in the order taken."""
    got: dict[str, list[int]] = {n: [] for n in order}
    while len(runs_):
        for worker in order:
            unit = runs_.take(worker)
            if unit is not None:
                got[worker].append(unit.id)
    return got


def runs(ids: list[int]) -> int:
    return sum(1 for k, i in enumerate(ids) if k == 0 or i != ids[k - 1] + 1)


def test_two_workers_split_the_units_into_two_runs():
    got = drain(Runs(units(100)), ["a", "b"])
    assert got == {"a": list(range(50)), "b": list(range(50, 100))}


def test_every_unit_once_and_few_runs_per_worker_when_speeds_differ():
    runs_ = Runs(units(1000))
    got = drain(runs_, ["fast", "fast", "fast", "slow", "mid", "mid"])
    assert sorted(i for ids in got.values() for i in ids) == list(range(1000))
    assert len(got["fast"]) > len(got["mid"]) > len(got["slow"]) > 0
    assert all(runs(ids) <= 12 for ids in got.values()), {n: runs(ids) for n, ids in got.items()}
    assert runs_.take("fast") is None and runs_.take("new") is None


def test_a_retried_unit_is_redone_first_on_its_worker_or_by_another_if_the_worker_is_gone():
    runs_ = Runs(units(10))
    first = runs_.take("a")
    runs_.retry(first, "a")
    assert runs_.take("a") is first
    lost = runs_.take("a")
    runs_.retry(lost, "gone")
    got = drain(runs_, ["a", "b"])
    assert lost.id == 1 and sorted(got["a"] + got["b"]) == list(range(1, 10))


def test_equal_worker_keys_are_one_worker():
    """Ray hands out equal but distinct actor handles: a worker is whatever compares equal."""
    runs_ = Runs(units(4))
    one, same = "".join(["w", "1"]), "".join(["w", "1"])
    assert one is not same
    assert [runs_.take(k).id for k in (one, same, one, same)] == [0, 1, 2, 3] and runs_.take(same) is None
