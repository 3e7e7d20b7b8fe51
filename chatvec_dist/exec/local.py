"""The local backend: the worker function on threads in this process (tests, debugging)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from ..planning.layout import Unit
from .worker import UnitResult, UnitRunner, WorkContext


class LocalBackend:
    name = "local"

    def __init__(self, ctx: WorkContext, workers: int, device: str = "auto") -> None:
        self.ctx = ctx
        self.workers = max(1, workers)
        self.device = device

    def run(self, units: Iterable[Unit], on_result: Callable[[UnitResult], None]) -> list[Unit]:
        """Run every unit; threads share this process, so no finished unit is ever in doubt (returns [])."""
        local = threading.local()
        runners: list[UnitRunner] = []

        def work(unit: Unit) -> UnitResult:
            if not hasattr(local, "runner"):
                local.runner = UnitRunner(self.ctx, device=self.device)
                runners.append(local.runner)
            return local.runner.run(unit)

        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="chatvec") as pool:
                pending = {pool.submit(work, u) for u in units}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    failed = [f.exception() for f in done if f.exception() is not None]
                    for f in done:
                        if f.exception() is None:
                            on_result(f.result())
                    if failed:
                        for f in pending:
                            f.cancel()
                        raise failed[0]
            return []
        finally:
            for r in runners:
                r.close()

    def close(self) -> None:
        pass
