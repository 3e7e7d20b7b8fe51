"""The local backend: the worker function on threads in this process (tests, debugging)."""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable

import torch

from ..planning.layout import Unit
from .compute import make_compute
from .messages import UnitResult, WorkContext
from .ray_backend import PIPELINE
from .worker import UnitRunner


class LocalBackend:
    name = "local"

    def __init__(self, ctx: WorkContext, workers: int | None, device: str = "auto") -> None:
        """`workers` threads (default: one per CPU; on GPUs, PIPELINE["cuda"] per GPU, spread over them). With
        `auto`, the GPU kernel is tried first: where it cannot run, the threads compute on the CPU, one per CPU."""
        self.ctx = ctx
        gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
        if gpus and device == "auto" and (why := make_compute(torch.device("cuda", 0), strict=False).fallback):
            print(f"chatvec: warning: computing on the CPU, a thread per core: {why}", file=sys.stderr)
            gpus, device = 0, "cpu"
        self.workers = max(1, workers or (PIPELINE["cuda"] * gpus if gpus else os.cpu_count() or 1))
        self.devices = [f"cuda:{i % gpus}" for i in range(self.workers)] if gpus else [device] * self.workers
        self.strict = device == "cuda"  # `auto` computes on the CPU where the GPU kernel cannot run (with a warning)
        self.sync_seconds = 0.0  # wall time of the slowest worker's final fsync in the last run
        self.first_ready: float | None = None  # perf_counter() when the first worker was ready for units

    def run(self, units: Iterable[Unit], on_result: Callable[[UnitResult], None]) -> list[Unit]:
        """Run every unit; threads share this process, so no finished unit is ever in doubt (returns []).

        Plain threads and queues, not an executor: Ctrl-C in the main thread stops the workers after their
        current unit, and nothing waits on a lock the interrupt may have left held.
        """
        todo: queue.SimpleQueue = queue.SimpleQueue()
        done: queue.SimpleQueue = queue.SimpleQueue()
        units = list(units)
        for unit in units:
            todo.put(unit)
        stop = threading.Event()
        syncs: list[float] = []
        readies: list[float] = []
        warned = threading.Lock()

        def work(device: str) -> None:
            runner = None
            try:
                runner = UnitRunner(self.ctx, device=device, strict=self.strict)
                readies.append(time.perf_counter())
                if runner.compute.fallback and warned.acquire(blocking=False):  # a GPU beside the one tried
                    print(
                        f"chatvec: warning: computing on the CPU: {runner.compute.fallback}; pass --device cpu to "
                        "use a thread per core",
                        file=sys.stderr,
                    )
                while not stop.is_set():
                    try:
                        unit = todo.get_nowait()
                    except queue.Empty:
                        return
                    done.put((runner.run(unit), None))
            except BaseException as e:  # handed to the main thread, which raises it
                done.put((None, e))
            finally:
                if runner is not None:
                    try:
                        t0 = time.perf_counter()
                        runner.close()
                        syncs.append(time.perf_counter() - t0)
                    except BaseException as e:
                        done.put((None, e))

        threads = [
            threading.Thread(target=work, args=(d,), name=f"chatvec-{i}", daemon=True)
            for i, d in enumerate(self.devices)
        ]
        intra_op = torch.get_num_threads()
        torch.set_num_threads(1)  # parallel over units, not inside ops: torch's idle OpenMP threads spin (measured)
        for t in threads:
            t.start()
        try:
            for _ in units:
                result, error = done.get()
                if error is not None:
                    raise error
                on_result(result)
        finally:
            stop.set()
            for t in threads:
                t.join()
            torch.set_num_threads(intra_op)
        self.sync_seconds = max(syncs, default=0.0)
        self.first_ready = min(readies, default=None)
        while not done.empty():  # an error closing a runner (fsync) after the last unit
            _, error = done.get()
            if error is not None:
                raise error
        return []

    def close(self) -> None:
        pass
