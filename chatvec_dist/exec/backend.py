"""The contract every backend keeps, and the choice of backend for a run."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from ..planning.layout import Unit
from ..recipe.spec import RunOptions
from .messages import UnitResult, WorkContext


class Backend(Protocol):
    """Runs units with `UnitRunner`s somewhere (threads here, Ray actors on a cluster).

    `run` calls `on_result` in the driver's thread once per finished unit, in any order, and returns the units
    whose results may be lost (finished by a worker that died before its final fsync): the caller rechecks
    them and runs the lost ones again. Every worker fsyncs its files before `run` returns.
    """

    name: str  # "local" or "ray", for the progress bar and the throughput line
    workers: int
    sync_seconds: float  # wall time of the final fsync in the last run
    first_ready: float | None  # perf_counter() when the first worker was ready for units

    def run(self, units: Iterable[Unit], on_result: Callable[[UnitResult], None]) -> list[Unit]: ...

    def close(self) -> None: ...


def make_backend(ctx: WorkContext, options: RunOptions) -> Backend:
    if options.backend == "local":
        from .local import LocalBackend

        return LocalBackend(ctx, options.workers, options.device)
    from .ray_backend import RayBackend

    return RayBackend(ctx, options.workers, options.address, options.cpus_per_worker, options.device)
