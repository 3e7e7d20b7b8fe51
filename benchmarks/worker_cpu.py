"""The workers' CPU seconds of one `chatvec` command (local backend): thread CPU time spent in `UnitRunner.run`,
summed over the worker threads, next to the whole process's. Worker threads share the driver's GIL, so this is
the part of a run's CPU the workers cost, whatever the machine's load.

    python benchmarks/worker_cpu.py merge --base B --chat C --cp CP --out O --no-progress --backend local
"""

from __future__ import annotations

import resource
import sys
import threading
import time

from chatvec_dist.cli.main import main
from chatvec_dist.exec import worker
from chatvec_dist.exec.messages import UnitResult
from chatvec_dist.planning.layout import Unit

spent: list[float] = []
lock = threading.Lock()
real = worker.UnitRunner.run


def timed(self: worker.UnitRunner, unit: Unit) -> UnitResult:
    start = time.thread_time()
    try:
        return real(self, unit)
    finally:
        with lock:
            spent.append(time.thread_time() - start)


if __name__ == "__main__":
    worker.UnitRunner.run = timed  # type: ignore[method-assign]
    t0 = time.perf_counter()
    code = main(sys.argv[1:])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"{len(spent)} units: workers {sum(spent):.2f} CPU s, process {usage.ru_utime + usage.ru_stime:.2f} CPU s, "
        f"wall {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    sys.exit(code)
