"""The local backend: the worker function on threads in this process (tests, debugging)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable

import torch

from ..log import logger
from ..planning.layout import Unit
from .device import local_devices
from .messages import UnitResult, WorkContext
from .worker import UnitRunner


class LocalBackend:
    name = "local"

    def __init__(self, ctx: WorkContext, workers: int | None, device: str = "auto") -> None:
        """`workers` threads, each on its device (`device.local_devices`)."""
        self.ctx = ctx
        self.devices = local_devices(device, workers)
        self.workers = len(self.devices)
        self.strict = device == "cuda"  # `auto` computes on the CPU where the GPU kernel cannot run (with a warning)
        self.sync_seconds = 0.0
        self.first_ready: float | None = None

    def run(self, units: Iterable[Unit], on_result: Callable[[UnitResult], None]) -> list[Unit]:
        """Run every unit; threads share this process, so no finished unit is ever in doubt (returns []).

        Plain threads and queues, not an executor: Ctrl-C in the main thread stops the workers after their
        current unit, and nothing waits on a lock the interrupt may have left held.
        """
        units = list(units)
        run = _Run(units)
        threads = [
            threading.Thread(target=self._work, args=(run, d), name=f"chatvec-{i}", daemon=True)
            for i, d in enumerate(self.devices)
        ]
        intra_op = torch.get_num_threads()
        torch.set_num_threads(1)  # parallel over units, not inside ops: torch's idle OpenMP threads spin (measured)
        for t in threads:
            t.start()
        try:
            for _ in units:
                on_result(run.next_result())
        finally:
            run.stop.set()
            for t in threads:
                t.join()
            torch.set_num_threads(intra_op)
        self.sync_seconds = max(run.syncs, default=0.0)
        self.first_ready = min(run.readies, default=None)
        run.raise_late_error()
        return []

    def _work(self, run: _Run, device: str) -> None:
        """One thread: a runner on `device` takes units until none is left, then fsyncs its files."""
        runner = None
        try:
            runner = UnitRunner(self.ctx, device=device, strict=self.strict)
            run.readies.append(time.perf_counter())
            if runner.compute.fallback and run.warned.acquire(blocking=False):  # a GPU beside the one tried
                logger.warning(
                    f"computing on the CPU: {runner.compute.fallback}; pass --device cpu to use a thread per core"
                )
            while not run.stop.is_set() and (unit := run.take()) is not None:
                run.done.put((runner.run(unit), None))
        except BaseException as e:  # handed to the main thread, which raises it
            run.done.put((None, e))
        finally:
            if runner is not None:
                try:
                    t0 = time.perf_counter()
                    runner.close()
                    run.syncs.append(time.perf_counter() - t0)
                except BaseException as e:
                    run.done.put((None, e))

    def close(self) -> None:
        pass


class _Run:
    """What the threads of one `run` share: the units to take, the results (or errors) they hand back."""

    def __init__(self, units: list[Unit]) -> None:
        self.todo: queue.SimpleQueue[Unit] = queue.SimpleQueue()
        for unit in units:
            self.todo.put(unit)
        self.done: queue.SimpleQueue[tuple[UnitResult | None, BaseException | None]] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.warned = threading.Lock()
        self.syncs: list[float] = []
        self.readies: list[float] = []

    def take(self) -> Unit | None:
        try:
            return self.todo.get_nowait()
        except queue.Empty:
            return None

    def next_result(self) -> UnitResult:
        result, error = self.done.get()
        if error is not None:
            raise error
        assert result is not None
        return result

    def raise_late_error(self) -> None:
        """An error closing a runner (its fsync) after the last unit."""
        while not self.done.empty():
            _, error = self.done.get()
            if error is not None:
                raise error
