"""What DARE and TIES cost: `chatvec merge` on bench.py's data (make it first: `python benchmarks/bench.py --size
medium`), plain, with `--dare 0.2` and with `--ties 0.2` (whose two-pass pre-pass is timed from its log line), each
a subprocess timed from spawn to exit. Prints a Markdown table; appends nothing.

    python benchmarks/sparse.py --data benchmarks/data/medium --backend local
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"plain": [], "dare 0.2": ["--dare", "0.2"], "ties 0.2": ["--ties", "0.2"]}


def run(data: Path, out: Path, extra: list[str], backend: str, workers: str | None) -> tuple[float, float, str]:
    """(wall s, CPU s of the children, stderr) of one merge."""
    args = [sys.executable, "-m", "chatvec_dist", "merge", "--base", str(data / "base"), "--chat", str(data / "chat")]
    args += ["--cp", str(data / "cp"), "--out", str(out), "--backend", backend, "--no-progress", *extra]
    args += ["--workers", workers] if workers else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, done.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).parent / "data" / "medium")
    p.add_argument("--backend", default="local")
    p.add_argument("--workers")
    p.add_argument("--work", type=Path, default=None, help="where outputs go (default: a temporary folder)")
    opts = p.parse_args()
    work = Path(tempfile.mkdtemp(dir=opts.work))
    print(f"data {opts.data}, backend {opts.backend}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| case | wall s | CPU s | TIES pre-pass s |\n|---|---|---|---|")
    try:
        for name, extra in CASES.items():
            out = work / name.replace(" ", "_")
            wall, cpu, err = run(opts.data, out, extra, opts.backend, opts.workers)
            prepass = re.search(r"TIES pre-pass: .* ([\d.]+) s", err)
            print(f"| {name} | {wall:.1f} | {cpu:.1f} | {prepass[1] if prepass else '—'} |", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
